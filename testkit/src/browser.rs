//! A minimal Chrome DevTools Protocol client, enough to drive a page in headless Chromium from
//! a test: launch, navigate, evaluate JavaScript, poll for a condition.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use colloquy_testkit::browser::Browser;
//!
//! let browser = Browser::launch().await?;
//! let page = browser.page().await?;
//! page.goto("http://127.0.0.1:8080/").await?;
//! page.wait_for("document.querySelector('#status')?.textContent === 'connected'", Duration::from_secs(10)).await?;
//! let title = page.eval("document.title").await?;
//! # let _ = title; Ok(()) }
//! ```
//!
//! The binary is `$CHROMIUM`, else `chromium` or `chromium-browser` on `PATH`
//! ([`find_chromium`]); a test that needs a browser should skip when that returns `None`.
//! Chromium runs headless with a throwaway profile, in its own process group, and the whole
//! group is killed when the [`Browser`] is dropped.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long Chromium may take to start and announce its DevTools endpoint.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one CDP command (or DevTools HTTP request) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a navigation may take to fire the load event.
const NAVIGATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Polling interval of [`Page::wait_for`].
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Console lines and page errors kept for diagnostics.
const LOG_LINES: usize = 200;

/// The Chromium binary to use: `$CHROMIUM` when set and non-empty (a bare name is looked up on
/// `PATH`), else `chromium` or `chromium-browser` on `PATH`. `None` only when `CHROMIUM` is unset
/// and neither is on `PATH`.
#[must_use]
pub fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM").filter(|p| !p.is_empty()) {
        // Set on purpose: returned even when it does not exist, so that launching fails loudly
        // rather than the caller skipping.
        let p = PathBuf::from(p);
        return Some(if p.components().count() == 1 {
            which(&p).unwrap_or(p)
        } else {
            p
        });
    }
    ["chromium", "chromium-browser"]
        .iter()
        .find_map(|name| which(Path::new(name)))
}

/// The executable `name` on `PATH`, if any.
pub(crate) fn which(name: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A headless Chromium. Killed, with its whole process group, on drop.
pub struct Browser {
    child: Child,
    pid: Option<u32>,
    /// `http://127.0.0.1:PORT`, the DevTools HTTP endpoint.
    devtools: String,
    http: reqwest::Client,
    stderr_task: JoinHandle<()>,
    /// The last lines Chromium wrote to stderr, for error messages.
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    // Last field: the profile directory is removed after the process is killed.
    _profile: tempfile::TempDir,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("pid", &self.pid)
            .field("devtools", &self.devtools)
            .finish_non_exhaustive()
    }
}

impl Browser {
    /// Launches the Chromium [`find_chromium`] finds.
    ///
    /// # Errors
    /// When there is no Chromium, or it does not start.
    pub async fn launch() -> anyhow::Result<Self> {
        let bin =
            find_chromium().context("no Chromium found: set CHROMIUM or put chromium on PATH")?;
        Self::launch_binary(&bin).await
    }

    /// Launches `bin` headless on a free DevTools port with a throwaway profile, and waits for
    /// its `DevTools listening on ws://...` line.
    ///
    /// # Errors
    /// When it does not start or does not announce its DevTools endpoint in time.
    pub async fn launch_binary(bin: &Path) -> anyhow::Result<Self> {
        let profile = tempfile::Builder::new()
            .prefix("colloquy-chromium-")
            .tempdir()
            .context("profile dir")?;
        let mut cmd = Command::new(bin);
        cmd.arg("--headless=new")
            .arg("--no-sandbox") // as root the sandbox refuses to start
            .arg("--disable-gpu")
            .arg("--remote-debugging-port=0")
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args([
                "--no-first-run",
                "--no-default-browser-check",
                "--no-proxy-server",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--mute-audio",
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so that drop kills the renderers and helpers too.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let pid = child.id();
        let stderr = child.stderr.take().context("no stderr pipe")?;

        // Read stderr up to the DevTools line, then keep draining it (a full pipe would stall
        // Chromium), keeping a tail for diagnostics.
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (found_tx, found_rx) = oneshot::channel::<String>();
        let stderr_task = tokio::spawn({
            let tail = Arc::clone(&tail);
            async move {
                let mut lines = BufReader::new(stderr).lines();
                let mut found_tx = Some(found_tx);
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(url) = line.trim().strip_prefix("DevTools listening on ")
                        && let Some(tx) = found_tx.take()
                    {
                        let _ = tx.send(url.trim().to_owned());
                    }
                    tracing::trace!(target: "chromium", "{line}");
                    push_bounded(&tail, line);
                }
            }
        });

        let mut browser = Self {
            child,
            pid,
            devtools: String::new(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(COMMAND_TIMEOUT)
                .build()?,
            stderr_task,
            stderr_tail: tail,
            _profile: profile,
        };
        let ws_url =
            match tokio::time::timeout(LAUNCH_TIMEOUT, found_rx).await {
                Ok(Ok(url)) => url,
                Ok(Err(_)) => {
                    // stderr closed without the line: Chromium exited (or closed stderr).
                    let status =
                        match tokio::time::timeout(Duration::from_secs(5), browser.child.wait())
                            .await
                        {
                            Ok(Ok(s)) => s.to_string(),
                            Ok(Err(e)) => e.to_string(),
                            Err(_) => "still running, stderr closed".into(),
                        };
                    bail!(
                        "Chromium exited before announcing DevTools ({status}); stderr:\n{}",
                        browser.stderr_tail()
                    );
                }
                Err(_) => bail!(
                    "Chromium did not announce DevTools within {LAUNCH_TIMEOUT:?}; stderr:\n{}",
                    browser.stderr_tail()
                ),
            };
        // ws://127.0.0.1:PORT/devtools/browser/<id>
        let hostport = ws_url
            .strip_prefix("ws://")
            .and_then(|r| r.split('/').next())
            .filter(|h| !h.is_empty())
            .with_context(|| format!("unexpected DevTools URL {ws_url}"))?;
        browser.devtools = format!("http://{hostport}");
        tracing::debug!(pid = ?browser.pid, devtools = %browser.devtools, "chromium started");
        Ok(browser)
    }

    /// The DevTools HTTP endpoint, `http://127.0.0.1:PORT`.
    #[must_use]
    pub fn devtools_url(&self) -> &str {
        &self.devtools
    }

    /// The last lines Chromium wrote to stderr.
    #[must_use]
    pub fn stderr_tail(&self) -> String {
        self.stderr_tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// The first page target (the `about:blank` tab Chromium starts with), or a new one when
    /// there is none, connected.
    ///
    /// # Errors
    /// When DevTools does not answer or the connection fails.
    pub async fn page(&self) -> anyhow::Result<Page> {
        // The initial tab can take a moment to be listed.
        for _ in 0..20 {
            let targets: Value = self.devtools_get("/json/list").await?;
            let ws = targets.as_array().into_iter().flatten().find_map(|t| {
                (t["type"] == "page")
                    .then(|| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
                    .flatten()
            });
            if let Some(ws) = ws {
                return Page::connect(&ws).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.new_page().await
    }

    /// Opens a new tab on `about:blank` and connects to it.
    ///
    /// # Errors
    /// When DevTools does not answer or the connection fails.
    pub async fn new_page(&self) -> anyhow::Result<Page> {
        let resp = self
            .http
            .put(format!("{}/json/new?about:blank", self.devtools))
            .send()
            .await
            .context("PUT /json/new")?;
        let status = resp.status();
        let body = resp.text().await?;
        if !status.is_success() {
            bail!("PUT /json/new: {status} {body}");
        }
        let target: Value = serde_json::from_str(&body)
            .with_context(|| format!("PUT /json/new answered {body}"))?;
        let ws = target["webSocketDebuggerUrl"]
            .as_str()
            .with_context(|| format!("no webSocketDebuggerUrl in {target}"))?;
        Page::connect(ws).await
    }

    async fn devtools_get(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.devtools);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            bail!("GET {url}: {status}");
        }
        resp.json()
            .await
            .with_context(|| format!("GET {url}: not JSON"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: the browser process and its zygotes, renderers and utilities.
        if let Some(pid) = self.pid {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // And the child itself, should the group kill have failed (kill_on_drop reaps it).
        let _ = self.child.start_kill();
        self.stderr_task.abort();
    }
}

fn push_bounded(buf: &Mutex<VecDeque<String>>, line: String) {
    if let Ok(mut b) = buf.lock() {
        if b.len() == LOG_LINES {
            b.pop_front();
        }
        b.push_back(line);
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;
type WsSink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;

/// One page (tab), connected over its own DevTools WebSocket. The `Runtime` and `Page` domains
/// are enabled: console output and uncaught exceptions are kept ([`Page::log`]) and included
/// in [`Page::wait_for`] timeouts.
pub struct Page {
    sink: tokio::sync::Mutex<WsSink>,
    next_id: AtomicU64,
    pending: Pending,
    events: broadcast::Sender<Value>,
    log: Arc<Mutex<VecDeque<String>>>,
    reader: JoinHandle<()>,
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Page").finish_non_exhaustive()
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Page {
    /// Connects to a page target's `webSocketDebuggerUrl` and enables `Page` and `Runtime`.
    ///
    /// # Errors
    /// When the connection or the enabling fails.
    pub async fn connect(ws_url: &str) -> anyhow::Result<Self> {
        let (ws, _) =
            tokio::time::timeout(COMMAND_TIMEOUT, tokio_tungstenite::connect_async(ws_url))
                .await
                .context("DevTools WebSocket connect timed out")?
                .with_context(|| format!("connect {ws_url}"))?;
        let (sink, mut stream) = ws.split();
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(1024);
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let reader = tokio::spawn({
            let pending = Arc::clone(&pending);
            let events = events.clone();
            let log = Arc::clone(&log);
            async move {
                while let Some(Ok(msg)) = stream.next().await {
                    let Message::Text(text) = msg else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                        continue;
                    };
                    if let Some(id) = v["id"].as_u64() {
                        let tx = pending.lock().ok().and_then(|mut p| p.remove(&id));
                        if let Some(tx) = tx {
                            let result = match v.get("error") {
                                Some(e) => Err(e.to_string()),
                                None => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
                            };
                            let _ = tx.send(result);
                        }
                    } else if v["method"].is_string() {
                        if let Some(line) = log_line(&v) {
                            push_bounded(&log, line);
                        }
                        let _ = events.send(v);
                    }
                }
                // Connection gone: fail every call still waiting.
                if let Ok(mut p) = pending.lock() {
                    p.clear();
                }
            }
        });
        let page = Self {
            sink: tokio::sync::Mutex::new(sink),
            next_id: AtomicU64::new(1),
            pending,
            events,
            log,
            reader,
        };
        page.call("Page.enable", json!({})).await?;
        page.call("Runtime.enable", json!({})).await?;
        Ok(page)
    }

    /// Sends one CDP command and returns its `result`.
    ///
    /// # Errors
    /// When the command fails, the connection is gone, or no answer comes in time.
    pub async fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .insert(id, tx);
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        let sent = self.sink.lock().await.send(Message::text(msg)).await;
        if let Err(e) = sent {
            if let Ok(mut p) = self.pending.lock() {
                p.remove(&id);
            }
            return Err(e).with_context(|| format!("{method}: send"));
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(Ok(result))) => Ok(result),
            Ok(Ok(Err(error))) => bail!("{method}: {error}"),
            Ok(Err(_)) => bail!("{method}: DevTools connection closed"),
            Err(_) => {
                if let Ok(mut p) = self.pending.lock() {
                    p.remove(&id);
                }
                bail!("{method}: no answer within {COMMAND_TIMEOUT:?}")
            }
        }
    }

    /// Navigates to `url` and waits until the new document has loaded (`readyState` is
    /// `complete` in the document the navigation created).
    ///
    /// # Errors
    /// When the navigation fails or does not load in time.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        let nav = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(err) = nav["errorText"].as_str().filter(|e| !e.is_empty()) {
            bail!("navigate to {url}: {err}");
        }
        // A cross-document navigation has a loader; wait until the main frame runs it, so that a
        // late `complete` from the previous document does not count.
        let loader = nav["loaderId"].as_str().map(str::to_owned);
        let deadline = tokio::time::Instant::now() + NAVIGATION_TIMEOUT;
        let mut last: String;
        loop {
            match self.loaded(loader.as_deref()).await {
                Ok(true) => return Ok(()),
                Ok(false) => last = "still loading".into(),
                Err(e) => last = format!("{e:#}"),
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{url} did not load within {NAVIGATION_TIMEOUT:?} ({last}){}",
                    self.log_suffix()
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    async fn loaded(&self, loader: Option<&str>) -> anyhow::Result<bool> {
        if let Some(loader) = loader {
            let tree = self.call("Page.getFrameTree", json!({})).await?;
            if tree["frameTree"]["frame"]["loaderId"] != loader {
                return Ok(false);
            }
        }
        Ok(self.eval("document.readyState").await? == "complete")
    }

    /// Evaluates `js` (an expression; a promise is awaited) in the page and returns its value
    /// as JSON (`null` for `undefined` and for values that do not serialise).
    ///
    /// # Errors
    /// When it throws, or the call fails.
    pub async fn eval(&self, js: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": js, "returnByValue": true, "awaitPromise": true, "userGesture": true }),
            )
            .await?;
        if let Some(ex) = r.get("exceptionDetails") {
            let what = ex["exception"]["description"]
                .as_str()
                .or_else(|| ex["text"].as_str())
                .map_or_else(|| ex.to_string(), str::to_owned);
            bail!("JavaScript threw: {what}\n  in: {js}");
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Polls `js` until it evaluates to a truthy value and returns that value. Evaluation
    /// errors count as "not yet" (a navigation may be in progress) and are reported on timeout,
    /// with the page's console log.
    ///
    /// # Errors
    /// When `timeout` passes first.
    pub async fn wait_for(&self, js: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last: String;
        loop {
            match self.eval(js).await {
                Ok(v) if truthy(&v) => return Ok(v),
                Ok(v) => last = format!("last value: {v}"),
                Err(e) => last = format!("last error: {e:#}"),
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for `{js}` ({last}){}",
                    self.log_suffix()
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// The page's console output and uncaught exceptions so far (the last few hundred lines).
    #[must_use]
    pub fn log(&self) -> String {
        self.log
            .lock()
            .map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    fn log_suffix(&self) -> String {
        match self.log() {
            log if log.is_empty() => String::new(),
            log => format!("\npage log:\n{log}"),
        }
    }

    /// A receiver of every CDP event of this page (`{"method": ..., "params": ...}`).
    #[must_use]
    pub fn events(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }
}

/// JavaScript truthiness of a JSON value (objects and arrays are truthy).
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// A log line for console calls and uncaught exceptions.
fn log_line(ev: &Value) -> Option<String> {
    let p = &ev["params"];
    match ev["method"].as_str()? {
        "Runtime.consoleAPICalled" => {
            let args: Vec<String> = p["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| match &a["value"] {
                    Value::String(s) => s.clone(),
                    Value::Null => a["description"].as_str().unwrap_or("undefined").to_owned(),
                    v => v.to_string(),
                })
                .collect();
            Some(format!(
                "console.{}: {}",
                p["type"].as_str().unwrap_or("log"),
                args.join(" ")
            ))
        }
        "Runtime.exceptionThrown" => {
            let d = &p["exceptionDetails"];
            let what = d["exception"]["description"]
                .as_str()
                .or_else(|| d["text"].as_str())
                .unwrap_or("?");
            Some(format!("uncaught: {what}"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truthiness_follows_javascript() {
        for v in [
            json!(true),
            json!(1),
            json!(-0.5),
            json!("x"),
            json!([]),
            json!({}),
        ] {
            assert!(truthy(&v), "{v}");
        }
        for v in [json!(null), json!(false), json!(0), json!(0.0), json!("")] {
            assert!(!truthy(&v), "{v}");
        }
    }

    #[test]
    fn console_and_exceptions_become_log_lines() {
        let c = json!({"method": "Runtime.consoleAPICalled", "params": {"type": "warn", "args": [{"type": "string", "value": "a"}, {"type": "number", "value": 2}]}});
        assert_eq!(log_line(&c).as_deref(), Some("console.warn: a 2"));
        let e = json!({"method": "Runtime.exceptionThrown", "params": {"exceptionDetails": {"text": "Uncaught", "exception": {"description": "TypeError: x"}}}});
        assert_eq!(log_line(&e).as_deref(), Some("uncaught: TypeError: x"));
        assert_eq!(
            log_line(&json!({"method": "Page.loadEventFired", "params": {}})),
            None
        );
    }
}
