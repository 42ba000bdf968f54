//! The chat page (`GET /`) in a real browser: headless Chromium driven over the DevTools
//! protocol against the whole stack. Skipped, with a notice, when no Chromium is installed
//! (`CHROMIUM`, or `chromium` / `chromium-browser` on PATH).
//!
//! Two plays: a conversation that streams and shows its answer, and a reconnect: answers that
//! landed while the page was disconnected (the relay paused) appear when it connects again.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_shows_answers_that_landed_while_it_was_disconnected() {
    let Some(chromium) = find_chromium() else {
        eprintln!(
            "SKIPPED the_chat_page_shows_answers_that_landed_while_it_was_disconnected: no Chromium \
             (set CHROMIUM or put chromium / chromium-browser on PATH)"
        );
        return;
    };
    let mut app = TestApp::spawn().await.expect("stack");
    let result = async {
        let browser = Browser::launch_binary(&chromium)
            .await
            .context("launch Chromium")?;
        let page = browser.page().await.context("page target")?;
        // A returning user (answered before) and one whose first answer comes after the reconnect.
        for (user, answered_before) in [("returning_user", true), ("first_timer", false)] {
            let played = reconnect(&mut app, &page, user, answered_before).await;
            if let Err(e) = played {
                return Err(anyhow::anyhow!("{user}: {e:#}\n{}", diagnose(&page).await));
            }
        }
        let log = page.log();
        ensure!(!log.contains("uncaught:"), "the page threw:\n{log}");
        Ok(())
    }
    .await;
    app.shutdown().await;
    if let Err(e) = result {
        panic!("{e:#}");
    }
}

/// Connect; ask (answered) when `answered_before`; pause the relay; ask again (acked); press
/// Disconnect; let the relay deliver; press Connect: the answer appears.
async fn reconnect(
    app: &mut TestApp,
    page: &Page,
    user: &str,
    answered_before: bool,
) -> anyhow::Result<()> {
    page.goto(&format!("{}/?userid={user}", app.http_base(0)))
        .await?;
    let status = |s: &str| {
        format!(
            "document.getElementById('status').textContent === {}",
            js_str(s)
        )
    };
    page.wait_for(&status("connected"), T)
        .await
        .context("connect")?;
    let mut stored = 0;
    if answered_before {
        ask(page, "first question").await?;
        answer_shown(page, "first question").await?;
        stored += 1;
    }
    app.stop_relay().await;
    let id = ask(page, "second question").await?;
    page.wait_for(
        &format!(
            "document.querySelector('.answer[data-msg-id=\"{id}\"]')?.parentElement?.querySelector('.meta .state')?.textContent === 'acked, waiting…'"
        ),
        T,
    )
    .await
    .context("the second question is acked")?;
    page.eval("document.getElementById('disconnect').click()")
        .await?;
    page.wait_for(&status("disconnected"), T)
        .await
        .context("disconnect")?;
    app.start_relay().await?;
    inbox_holds(app, user, stored + 1).await?;
    ensure!(
        page.eval(&format!(
            "!!document.querySelector('.answer.done[data-msg-id=\"{id}\"]')"
        ))
        .await?
            == Value::Bool(false),
        "the answer showed while disconnected"
    );
    page.eval("document.getElementById('connect').click()")
        .await?;
    page.wait_for(&status("connected"), T)
        .await
        .context("reconnect")?;
    let text = answer_shown(page, "second question").await?;
    ensure!(text.starts_with("echo: second question"), "{text:?}");
    Ok(())
}

/// Types `question`, clicks Send and returns the new answer bubble's message id.
async fn ask(page: &Page, question: &str) -> anyhow::Result<String> {
    let q = js_str(question);
    let id = page
        .eval(&format!(
            r"(() => {{
                document.getElementById('input').value = {q};
                document.getElementById('send').click();
                const answers = document.querySelectorAll('.answer[data-msg-id]');
                return answers[answers.length - 1]?.dataset.msgId ?? null;
            }})()"
        ))
        .await?;
    id.as_str()
        .map(str::to_owned)
        .context("clicking Send created no answer bubble")
}

/// Waits for the final answer whose text contains `question` (the fake LLM echoes it).
async fn answer_shown(page: &Page, question: &str) -> anyhow::Result<String> {
    let q = js_str(question);
    let text = page
        .wait_for(
            &format!(
                "[...document.querySelectorAll('.answer.done')].find((a) => a.textContent.includes({q}))?.textContent ?? null"
            ),
            T,
        )
        .await
        .with_context(|| format!("the answer to {question:?}"))?;
    Ok(text.as_str().unwrap_or_default().to_owned())
}

/// Waits until the user's inbox holds `n` entries: the relay delivered while the page was away.
async fn inbox_holds(app: &TestApp, user: &str, n: usize) -> anyhow::Result<()> {
    use fred::prelude::StreamsInterface;
    let pool = colloquy_core::redis::pool(&app.redis()).await?;
    let key = app
        .names
        .inbox_key(&colloquy_core::UserId::parse(user).context("userid")?);
    for _ in 0..300 {
        let len: usize = pool.xlen(&key).await?;
        if len >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the inbox of {user} never held {n} entries")
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
