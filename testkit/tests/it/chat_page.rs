//! The chat page (`GET /`) in a real browser: headless Chromium driven over the DevTools
//! protocol against the whole stack. Skipped, with a notice, when no Chromium is installed
//! (`CHROMIUM`, or `chromium` / `chromium-browser` on PATH).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::Value;

use colloquy_testkit::browser::{Browser, Page, find_chromium};
use colloquy_testkit::fake_llm::FakeLlmConfig;
use colloquy_testkit::{LlmChoice, TestApp};

const T: Duration = Duration::from_secs(30);
const USER: &str = "browser_user";
const QUESTION: &str = "Which bridge crosses the Golden Gate strait?";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_connects_streams_and_shows_the_answer_with_its_latency() {
    let Some(chromium) = find_chromium() else {
        eprintln!(
            "SKIPPED the_chat_page_connects_streams_and_shows_the_answer_with_its_latency: no Chromium \
             (set CHROMIUM or put chromium / chromium-browser on PATH)"
        );
        return;
    };
    // Paced tokens (8 at 20/s) so the answer visibly streams before it is final.
    let fake = FakeLlmConfig {
        token_rate: 20.0,
        ..FakeLlmConfig::default()
    };
    let app = TestApp::builder()
        .llm(LlmChoice::Fake(fake))
        .spawn()
        .await
        .expect("stack");
    let result = drive(&app, &chromium).await;
    app.shutdown().await;
    if let Err(e) = result {
        panic!("{e:#}");
    }
}

async fn drive(app: &TestApp, chromium: &Path) -> anyhow::Result<()> {
    let browser = Browser::launch_binary(chromium)
        .await
        .context("launch Chromium")?;
    let page = browser.page().await.context("page target")?;
    let url = format!("{}/?userid={USER}", app.http_base(0));
    page.goto(&url).await?;
    let result = chat(&page).await;
    match result {
        Ok(()) => {
            let log = page.log();
            ensure!(!log.contains("uncaught:"), "the page threw:\n{log}");
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("{e:#}\n{}", diagnose(&page).await)),
    }
}

async fn chat(page: &Page) -> anyhow::Result<()> {
    // `?userid=` pre-fills the field and connects at once.
    page.wait_for(
        "document.getElementById('status').textContent === 'connected'",
        T,
    )
    .await
    .context("connect")?;
    assert_eq!(
        page.eval("document.getElementById('userid').value").await?,
        USER
    );
    assert_eq!(
        page.eval("document.querySelector('.conn').dataset.state")
            .await?,
        "open"
    );

    // Type and click Send; in the same turn of the event loop (so before any frame can arrive)
    // watch the new answer bubble and record its text while it is not final.
    let q = js_str(QUESTION);
    let sent = page
        .eval(&format!(
            r"(() => {{
                document.getElementById('input').value = {q};
                document.getElementById('send').click();
                const answers = document.querySelectorAll('.answer[data-msg-id]');
                const a = answers[answers.length - 1];
                if (!a) return null;
                window.__partials = [];
                new MutationObserver(() => {{
                    if (!a.classList.contains('done')) window.__partials.push(a.textContent);
                }}).observe(a, {{ childList: true, characterData: true, subtree: true }});
                return {{ id: a.dataset.msgId, question: a.previousElementSibling?.textContent ?? null,
                          input: document.getElementById('input').value }};
            }})()"
        ))
        .await?;
    let id = sent["id"]
        .as_str()
        .context("clicking Send created no answer bubble")?
        .to_owned();
    ensure!(!id.is_empty(), "answer bubble without a message id: {sent}");
    assert_eq!(
        sent["question"], QUESTION,
        "the question bubble shows what was typed"
    );
    assert_eq!(sent["input"], "", "the input is cleared on send");

    // The final answer: an `.answer.done` whose text contains the question.
    let done = page
        .wait_for(
            &format!(
                r"(() => {{
                    const a = [...document.querySelectorAll('.answer.done')].find((a) => a.textContent.includes({q}));
                    return a ? {{ id: a.dataset.msgId, text: a.textContent }} : null;
                }})()"
            ),
            T,
        )
        .await
        .context("final answer")?;
    assert_eq!(
        done["id"],
        id.as_str(),
        "the answer is for the message sent"
    );
    let answer = done["text"].as_str().context("answer text")?.to_owned();
    assert!(
        answer.starts_with(&format!("echo: {QUESTION}")),
        "the fake LLM echoes the question: {answer:?}"
    );

    // Its meta line: the end-to-end latency, the time to first token, no error.
    let meta = page
        .eval(&format!(
            r"(() => {{
                const a = document.querySelector('.answer[data-msg-id={id}]');
                const m = a.parentElement.querySelector('.meta');
                const text = (sel) => m.querySelector(sel)?.textContent ?? null;
                return {{ latency: text('.latency'), ttft: text('.ttft'), trace: text('.trace'), error: text('.err'),
                          state: text('.state'), all: m.textContent }};
            }})()",
            id = js_str(&id)
        ))
        .await?;
    ensure!(
        meta["error"].is_null() && meta["state"].is_null(),
        "meta line of a finished answer: {meta}"
    );
    let latency = meta["latency"]
        .as_str()
        .with_context(|| format!("no latency shown: {meta}"))?;
    let latency_ms = parse_duration_ms(latency)
        .with_context(|| format!("latency {latency:?} is not a duration"))?;
    assert!(
        latency_ms > 0.0 && latency_ms < T.as_secs_f64() * 1000.0,
        "latency {latency:?}"
    );
    // The trace id from the ack, shown for copying.
    let trace = meta["trace"]
        .as_str()
        .with_context(|| format!("no trace id shown: {meta}"))?;
    let hex = trace.strip_prefix("trace ").unwrap_or_default();
    ensure!(
        hex.len() == 32
            && hex.bytes().all(|b| b.is_ascii_hexdigit())
            && hex.bytes().any(|b| b != b'0'),
        "trace {trace:?}"
    );

    // Streaming: deltas arrived before the response (the page shows the time to first token),
    // and the bubble showed a growing prefix of the answer before the final text.
    let ttft = meta["ttft"].as_str().with_context(|| {
        format!("no time to first token shown (no delta arrived before the response): {meta}")
    })?;
    let ttft_ms = ttft
        .strip_prefix("first token ")
        .and_then(parse_duration_ms)
        .with_context(|| format!("time to first token {ttft:?} is not `first token <duration>`"))?;
    assert!(
        ttft_ms <= latency_ms,
        "first token ({ttft}) after the final answer ({latency})"
    );
    let partials = page.eval("window.__partials").await?;
    let partials: Vec<&str> = partials
        .as_array()
        .context("partials")?
        .iter()
        .filter_map(Value::as_str)
        .filter(|p| !p.is_empty())
        .collect();
    ensure!(
        partials.iter().any(|p| p.len() < answer.len()),
        "the answer never showed partial text before the final one: {partials:?}"
    );
    for p in &partials {
        ensure!(
            answer.starts_with(p),
            "streamed text {p:?} is not a prefix of the answer {answer:?}"
        );
    }
    let mut lens: Vec<usize> = partials.iter().map(|p| p.len()).collect();
    lens.dedup();
    ensure!(
        lens.windows(2).all(|w| w[0] < w[1]),
        "streamed text did not only grow: {partials:?}"
    );
    eprintln!(
        "chat page: {answer:?} in {latency} ({ttft}), {} partial renders before the final one",
        partials.len()
    );
    Ok(())
}

/// A JavaScript string literal for `s` (JSON strings are JavaScript strings).
fn js_str(s: &str) -> String {
    Value::from(s).to_string()
}

/// The page's durations: `123 ms` or `1.23 s`.
fn parse_duration_ms(s: &str) -> Option<f64> {
    if let Some(ms) = s.strip_suffix(" ms") {
        return ms.parse::<u64>().ok().map(|v| v as f64);
    }
    let secs: f64 = s.strip_suffix(" s")?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then_some(secs * 1000.0)
}

/// What the page shows, for a failure message.
async fn diagnose(page: &Page) -> String {
    let shown = page
        .eval("JSON.stringify({ status: document.getElementById('status')?.textContent, url: location.href, messages: document.getElementById('messages')?.innerText })")
        .await
        .map_or_else(|e| format!("(page not readable: {e:#})"), |v| v.as_str().unwrap_or_default().to_owned());
    match page.log() {
        log if log.is_empty() => format!("page: {shown}"),
        log => format!("page: {shown}\npage log:\n{log}"),
    }
}
