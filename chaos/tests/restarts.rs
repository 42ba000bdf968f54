//! `scripts/stack.sh down && scripts/stack.sh up`, again and again, on the durable broker:
//! every start must answer at once (the consumers hold their partitions before "up" returns)
//! and nothing sent after a start may go unanswered.
//!
//! `CHAOS_RESTARTS` sets the number of cycles (20 by default, as the delivery issue asks).

use std::time::{Duration, Instant};

use colloquy_chaos::stack::{Stack, StackOptions};
use colloquy_core::wire::ServerFrame;
use colloquy_testkit::client::{WsClient, fetch_token};

const MESSAGES: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_start_of_a_restarted_stack_answers() -> anyhow::Result<()> {
    let cycles: usize = std::env::var("CHAOS_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut stack = Stack::launch(StackOptions {
        name: "restarts".into(),
        ..StackOptions::default()
    })
    .await?;
    let http = reqwest::Client::new();
    let mut firsts = Vec::new();
    for cycle in 0..cycles {
        if cycle > 0 {
            let t = Instant::now();
            stack.restart_all().await?;
            eprintln!(
                "cycle {cycle}: down and up in {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
        let up = Instant::now();
        let user = format!("restart{cycle}");
        let token = fetch_token(&http, &stack.http_base(), &user).await?;
        let ws_base = stack
            .ws_bases()
            .split(',')
            .next()
            .unwrap_or_default()
            .to_owned();
        let mut ws = WsClient::connect(&ws_base, &user, &token, None).await?;
        for n in 0..MESSAGES {
            ws.send_message(&format!("c{cycle}-{n}"), &format!("question {n}"))
                .await?;
        }
        let mut answered = 0;
        let mut first = None;
        while answered < MESSAGES {
            let frame = ws
                .recv_until(Duration::from_secs(30), |f| {
                    matches!(f, ServerFrame::Response { .. } | ServerFrame::Error { .. })
                })
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cycle {cycle}: {answered} of {MESSAGES} answered ({e}); logs in {}",
                        stack.keep_dir().display()
                    )
                })?;
            match frame {
                ServerFrame::Response { .. } => {
                    answered += 1;
                    first.get_or_insert_with(|| up.elapsed());
                }
                other => anyhow::bail!("cycle {cycle}: {other:?}"),
            }
        }
        let first = first.unwrap_or_default();
        eprintln!(
            "cycle {cycle}: {answered}/{MESSAGES} answered, first after {} ms, all after {} ms",
            first.as_millis(),
            up.elapsed().as_millis()
        );
        firsts.push(first);
        ws.close().await;
    }
    firsts.sort();
    eprintln!(
        "{cycles} starts: first answer after up, median {} ms, max {} ms",
        firsts[firsts.len() / 2].as_millis(),
        firsts.last().copied().unwrap_or_default().as_millis()
    );
    Ok(())
}
