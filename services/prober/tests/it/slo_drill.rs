//! The SLO drill of issue 15, on an in-process stack watched by a real Prometheus loaded with
//! `alerts/*.yml`: under the prober's steady traffic every dashboard, runbook and rule query is
//! accepted and names only metrics that have data (`alerts/check-queries.sh --prometheus`);
//! then the ai-consumer is killed for two minutes, and the prober fails and the availability
//! burn-rate and probe alerts go pending; restarted, it answers and probes succeed again.
//!
//! Ignored by default: it needs `prometheus` on PATH and takes about four minutes.
//! `cargo test -p colloquy-prober --test it -- --ignored --nocapture slo_drill`

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use colloquy_prober::{Application, ProberConfig, Settings};
use colloquy_testkit::TestApp;
use tokio_util::sync::CancellationToken;

/// Kills the Prometheus this test started when the test ends, however it ends.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// States of the alerts Prometheus holds now: name -> "pending" | "firing".
async fn alerts(http: &reqwest::Client, base: &str) -> Vec<(String, String)> {
    let Ok(resp) = http.get(format!("{base}/api/v1/alerts")).send().await else {
        return Vec::new();
    };
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    body["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                a["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

async fn query(http: &reqwest::Client, base: &str, q: &str) -> Option<f64> {
    let body: serde_json::Value = http
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs prometheus on PATH; takes about four minutes"]
async fn slo_drill_consumer_killed_for_two_minutes() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("prometheus is not on PATH");
    }
    let mut app = TestApp::spawn().await.expect("stack");
    let mut cfg = ProberConfig::local(app.http_base(0));
    cfg.interval_secs = 1;
    cfg.answer_timeout_ms = 5_000;
    let prober = Application::build(Settings { prober: cfg }).await.unwrap();
    let prober_port = prober.metrics_port();
    let stop_prober = CancellationToken::new();
    let prober_task = tokio::spawn(prober.run_until_stopped(stop_prober.clone()));

    // Every service of the in-process stack shares one recorder, so the gateway's /metrics
    // holds the consumer's and relay's series too.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {root}/alerts/*.yml\n\
         scrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: [\"127.0.0.1:{gw}\"]\n\
         \x20 - job_name: prober\n    static_configs:\n      - targets: [\"127.0.0.1:{prober_port}\"]\n",
        root = repo_root().display(),
        gw = app.gateways[0].port,
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let _prometheus = Prometheus(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    let http = reqwest::Client::new();

    // Healthy, under the prober's traffic, for a minute: every query is accepted and has data.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let up = query(&http, &base, "sum(up)").await;
    assert_eq!(up, Some(2.0), "both targets scraped");
    let check = Command::new("bash")
        .arg(repo_root().join("alerts/check-queries.sh"))
        .args(["--prometheus", &base, "--allow-missing", "probe_success"])
        .output()
        .expect("run check-queries.sh");
    let report = String::from_utf8_lossy(&check.stdout);
    println!(
        "check-queries.sh --prometheus (tail):\n{}",
        report.lines().rev().take(25).collect::<Vec<_>>().join("\n")
    );
    assert!(
        check.status.success(),
        "check-queries.sh failed:\n{}\n{}",
        report
            .lines()
            .filter(|l| l.starts_with("FAIL"))
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&check.stderr)
    );
    // Only the alerts this drill is about: a partial stack may trip others (the in-process
    // stack has no blackbox exporter, and its services share one metrics endpoint).
    let active = alerts(&http, &base).await;
    println!("alerts on the healthy stack: {active:?}");
    assert!(
        !active
            .iter()
            .any(|(n, _)| n.contains("BudgetBurn") || n.starts_with("ColloquyProbe")),
        "SLO or probe alerts on a healthy stack: {active:?}"
    );

    // Kill the ai-consumer (abruptly) for two minutes.
    let killed = Instant::now();
    app.consumer.take().expect("consumer").abort();
    let mut burn_pending = None;
    let mut probe_pending = None;
    let mut probe_firing = None;
    while killed.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = alerts(&http, &base).await;
        let has = |name: &str, states: &[&str]| {
            now.iter()
                .any(|(n, s)| n == name && states.contains(&s.as_str()))
        };
        if burn_pending.is_none()
            && has("ColloquyAvailabilityBudgetBurnFast", &["pending", "firing"])
        {
            burn_pending = Some(killed.elapsed());
        }
        if probe_pending.is_none() && has("ColloquyProbeFailing", &["pending", "firing"]) {
            probe_pending = Some(killed.elapsed());
        }
        if probe_firing.is_none() && has("ColloquyProbeFailing", &["firing"]) {
            probe_firing = Some(killed.elapsed());
        }
    }
    let success = query(&http, &base, "min(colloquy_probe_success)").await;
    let failed = query(
        &http,
        &base,
        "sum(increase(colloquy_probes_total{outcome=\"no_answer\"}[2m]))",
    )
    .await;
    let burn_5m = query(&http, &base, "colloquy:sli_availability:error_ratio_5m").await;
    println!(
        "consumer killed for 120 s: availability fast burn pending after {burn_pending:?}, \
         probe alert pending after {probe_pending:?} and firing after {probe_firing:?}, probe_success {success:?}, \
         no_answer probes in 2m {failed:?}, availability error ratio 5m {burn_5m:?}"
    );
    assert!(
        burn_pending.is_some(),
        "the availability burn alert never went pending"
    );
    assert!(
        probe_pending.is_some(),
        "ColloquyProbeFailing never went pending"
    );
    assert_eq!(success, Some(0.0));
    assert!(failed.unwrap_or(0.0) > 10.0, "no_answer probes: {failed:?}");

    // Restarted, it answers the backlog and the probes succeed again.
    app.start_consumer().await.unwrap();
    let recovered = Instant::now();
    let mut ok = false;
    while recovered.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if query(&http, &base, "min(colloquy_probe_success)").await == Some(1.0) {
            ok = true;
            break;
        }
    }
    println!(
        "consumer restarted: probes succeed again after {:?}",
        recovered.elapsed()
    );
    assert!(ok, "probes still fail a minute after the restart");

    stop_prober.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), prober_task).await;
    app.shutdown().await;
}
