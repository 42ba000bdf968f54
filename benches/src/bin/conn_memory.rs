//! `conn-memory`: resident memory a gateway spends per idle WebSocket connection.
//!
//! Fetches one token per distinct userid (the gateway allows only a few sockets per user),
//! reads the gateway's `VmRSS`, opens N sockets, lets them settle, reads `VmRSS` again and
//! prints the difference per connection; then closes them and reads it once more. The client
//! and the gateway each need a descriptor per socket, so both limits are checked first: when
//! either is too low the run is clamped to what fits and the figure for N is extrapolated,
//! and said to be.
//!
//! Usage (the shell's limit is inherited by this process; the gateway needs its own):
//!
//! ```text
//! ulimit -n 65536
//! conn-memory --gateway-pid "$(cat run/pids/gateway-1.pid)" \
//!     --http http://127.0.0.1:8001 --ws ws://127.0.0.1:8001 --connections 10000
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use colloquy_benches::proc_status::{Limit, Rss, open_files_limit};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Descriptors the gateway needs besides client sockets (listener, Kafka, Redis, logs, epoll).
const GATEWAY_FD_MARGIN: u64 = 64;
/// Descriptors this process needs besides its sockets.
const CLIENT_FD_MARGIN: u64 = 64;
/// The gauge the gateway keeps of its open sessions.
const CONNECTIONS_GAUGE: &str = "colloquy_connections";

#[derive(Debug, Parser)]
#[command(about = "Measure a gateway's resident memory per idle WebSocket connection")]
struct Args {
    /// Pid of the gateway process whose memory is measured (it must serve --http and --ws).
    #[arg(long)]
    gateway_pid: u32,
    /// HTTP base of that gateway, for POST /token and GET /metrics.
    #[arg(long, default_value = "http://127.0.0.1:8001")]
    http: String,
    /// WebSocket base of that gateway (connect to it directly, not through nginx).
    #[arg(long, default_value = "ws://127.0.0.1:8001")]
    ws: String,
    /// Idle connections to open, one userid each.
    #[arg(long, default_value_t = 10_000)]
    connections: u64,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds to wait after the last connection before reading the gateway's memory.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Seconds to keep the connections open after the measurement (a second reading is taken).
    #[arg(long, default_value_t = 5)]
    hold_secs: u64,
    /// Send one `ping` frame on every connection and wait for its `pong` before measuring, so
    /// the figure is for a socket that has been used once rather than one that never was.
    #[arg(long)]
    ping: bool,
    /// Prefix of the generated userids (the pid of this process is appended, so runs never share users).
    #[arg(long, default_value = "connmem")]
    user_prefix: String,
}

#[derive(Debug, Deserialize)]
struct TokenResponse {
    token: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pid = args.gateway_pid;
    let http = args.http.trim_end_matches('/').to_owned();
    let ws = args.ws.trim_end_matches('/').to_owned();

    let n = plan_connections(pid, args.connections)?;
    let run = format!("{}{}", args.user_prefix, std::process::id());
    let users: Vec<String> = (0..n).map(|i| format!("{run}-{i}")).collect();

    let client = reqwest::Client::new();
    let started = Instant::now();
    let tokens = fetch_tokens(&client, &http, &users, args.concurrency).await?;
    println!(
        "fetched {} tokens in {:.1}s",
        tokens.len(),
        started.elapsed().as_secs_f64()
    );
    // Close the keep-alive HTTP connections so their buffers are not counted as socket cost.
    drop(client);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let sessions_before = sessions(&http).await?;
    let fds_before = open_fds(pid)?;
    let before = rss(pid)?;

    let started = Instant::now();
    let (mut sockets, failures) =
        open_sockets(&ws, users.iter().zip(&tokens), args.concurrency).await;
    println!(
        "opened {} of {} connections in {:.1}s",
        sockets.len(),
        n,
        started.elapsed().as_secs_f64()
    );
    if let Some((count, first)) = &failures {
        println!("{count} connections failed; the first: {first}");
    }
    if args.ping {
        let answered = ping_all(&mut sockets, args.concurrency).await;
        println!(
            "{answered} of {} connections answered a ping",
            sockets.len()
        );
    }
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;

    let after = rss(pid)?;
    let fds_after = open_fds(pid)?;
    let sessions_after = sessions(&http).await?;
    let open = sessions_after.saturating_sub(sessions_before);
    println!("gateway sessions ({CONNECTIONS_GAUGE}): {sessions_before} -> {sessions_after}");
    println!("gateway open fds: {fds_before} -> {fds_after}");
    if open == 0 {
        bail!("no session opened on the gateway; is --http the same gateway as --gateway-pid?");
    }
    report("after settling", before, after, open);

    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let held = rss(pid)?;
    report(
        &format!("after {}s more", args.hold_secs),
        before,
        held,
        open,
    );
    if open < args.connections {
        let per_conn = after.total_kib.saturating_sub(before.total_kib) as f64 / open as f64;
        println!(
            "EXTRAPOLATED (measured {open}, not {}): VmRSS at {} connections ~ {:.0} KiB = {:.1} MiB",
            args.connections,
            args.connections,
            before.total_kib as f64 + per_conn * args.connections as f64,
            (before.total_kib as f64 + per_conn * args.connections as f64) / 1024.0
        );
    }

    let started = Instant::now();
    futures::stream::iter(sockets.iter_mut())
        .for_each_concurrent(args.concurrency * 4, |s| async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), s.close(None)).await;
        })
        .await;
    drop(sockets);
    let closing = started.elapsed();
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let closed = rss(pid)?;
    println!(
        "closed in {:.1}s; gateway sessions now {}, VmRSS {} KiB ({:+} KiB against before: memory the allocator kept)",
        closing.as_secs_f64(),
        sessions(&http).await?,
        closed.total_kib,
        closed.total_kib as i64 - before.total_kib as i64
    );
    Ok(())
}

/// How many connections fit in both processes' descriptor limits; says so when fewer than asked.
fn plan_connections(pid: u32, wanted: u64) -> anyhow::Result<u64> {
    let gateway = fd_limit(&format!("/proc/{pid}/limits"))?;
    let own = fd_limit("/proc/self/limits")?;
    let gateway_room = gateway.soft.map_or(u64::MAX, |s| {
        s.saturating_sub(open_fds(pid).unwrap_or(0) + GATEWAY_FD_MARGIN)
    });
    let own_room = own
        .soft
        .map_or(u64::MAX, |s| s.saturating_sub(CLIENT_FD_MARGIN));
    println!(
        "open-files limit (soft/hard): gateway {} / {}, this process {} / {}",
        show(gateway.soft),
        show(gateway.hard),
        show(own.soft),
        show(own.hard)
    );
    let n = wanted.min(gateway_room).min(own_room);
    if n < wanted {
        println!(
            "WARNING: only {n} of {wanted} connections fit ({}); raise it with `ulimit -n 65536` \
             before starting {}; the result for {wanted} will be extrapolated",
            if gateway_room < own_room {
                "the gateway's open-files limit"
            } else {
                "this process' open-files limit"
            },
            if gateway_room < own_room {
                "the gateway"
            } else {
                "conn-memory"
            },
        );
    }
    if n == 0 {
        bail!("no room for any connection under the open-files limits");
    }
    Ok(n)
}

fn show(v: Option<u64>) -> String {
    v.map_or_else(|| "unlimited".to_owned(), |v| v.to_string())
}

fn fd_limit(path: &str) -> anyhow::Result<Limit> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    open_files_limit(&text).with_context(|| format!("no `Max open files` line in {path}"))
}

fn rss(pid: u32) -> anyhow::Result<Rss> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path}; is the gateway running?"))?;
    Rss::parse(&text).with_context(|| format!("no VmRSS in {path}"))
}

fn open_fds(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&path)
        .with_context(|| format!("cannot list {path}"))?
        .count() as u64)
}

fn report(when: &str, before: Rss, after: Rss, open: u64) {
    let delta = after.total_kib as i64 - before.total_kib as i64;
    let delta_anon = after.anon_kib as i64 - before.anon_kib as i64;
    println!(
        "{when}: {open} connections; VmRSS {} -> {} KiB (+{delta} KiB), {:.2} KiB per connection; \
         RssAnon {} -> {} KiB, {:.2} KiB per connection",
        before.total_kib,
        after.total_kib,
        delta as f64 / open as f64,
        before.anon_kib,
        after.anon_kib,
        delta_anon as f64 / open as f64,
    );
}

/// The gateway's open-session gauge, from its Prometheus text.
async fn sessions(http: &str) -> anyhow::Result<u64> {
    let text = reqwest::get(format!("{http}/metrics"))
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("GET {http}/metrics"))?
        .text()
        .await
        .context("reading /metrics")?;
    let total: f64 = text
        .lines()
        .filter(|l| {
            l.strip_prefix(CONNECTIONS_GAUGE)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Ok(total.max(0.0) as u64)
}

async fn fetch_tokens(
    client: &reqwest::Client,
    http: &str,
    users: &[String],
    concurrency: usize,
) -> anyhow::Result<Vec<String>> {
    let results: Vec<anyhow::Result<String>> = futures::stream::iter(users)
        .map(|user| async move {
            let response = client
                .post(format!("{http}/token?userid={user}"))
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .with_context(|| format!("POST {http}/token?userid={user}"))?;
            Ok(response
                .json::<TokenResponse>()
                .await
                .context("token response")?
                .token)
        })
        .buffered(concurrency)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Opens one socket per (user, token); returns the open ones and (failures, first error).
async fn open_sockets<'a>(
    ws: &str,
    pairs: impl Iterator<Item = (&'a String, &'a String)>,
    concurrency: usize,
) -> (Vec<Socket>, Option<(u64, String)>) {
    let results: Vec<anyhow::Result<Socket>> = futures::stream::iter(pairs)
        .map(|(user, token)| async move {
            let url = format!("{ws}/ws?userid={user}&token={token}");
            let (socket, _) = tokio::time::timeout(
                Duration::from_secs(10),
                tokio_tungstenite::connect_async(url),
            )
            .await
            .context("connect timed out after 10s")?
            .with_context(|| format!("connect as {user}"))?;
            Ok(socket)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut sockets = Vec::with_capacity(results.len());
    let mut failures: Option<(u64, String)> = None;
    for r in results {
        match r {
            Ok(s) => sockets.push(s),
            Err(e) => match &mut failures {
                Some((count, _)) => *count += 1,
                None => failures = Some((1, format!("{e:#}"))),
            },
        }
    }
    (sockets, failures)
}

/// Sends `{"type":"ping"}` on every socket and waits for the next text frame; returns how many answered.
async fn ping_all(sockets: &mut [Socket], concurrency: usize) -> usize {
    futures::stream::iter(sockets.iter_mut())
        .map(|s| async move {
            let exchange = async {
                s.send(Message::Text(r#"{"type":"ping"}"#.into()))
                    .await
                    .ok()?;
                while let Some(Ok(m)) = s.next().await {
                    if m.is_text() {
                        return Some(());
                    }
                }
                None
            };
            tokio::time::timeout(Duration::from_secs(10), exchange)
                .await
                .ok()
                .flatten()
                .is_some()
        })
        .buffer_unordered(concurrency)
        .filter(|answered| std::future::ready(*answered))
        .count()
        .await
}
