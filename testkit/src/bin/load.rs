//! `colloquy-load`: drive a running stack with simulated users and print throughput,
//! latency percentiles and the delivery checker's verdict. Exits 1 when anything acked was lost.

use std::sync::Arc;

use clap::Parser;

use colloquy_testkit::checker::Checker;
use colloquy_testkit::load::{self, LoadConfig};

#[derive(Debug, Parser)]
#[command(
    name = "colloquy-load",
    about = "Load generator and delivery checker for Colloquy"
)]
struct Cli {
    #[command(flatten)]
    load: LoadConfig,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let cfg = cli.load;
    println!(
        "load: users={} messages/user={} window={} rate={} protocol={:?} -> {}",
        cfg.users, cfg.messages, cfg.window, cfg.rate, cfg.protocol, cfg.ws
    );
    let report = load::run(cfg, Arc::new(Checker::default())).await;
    println!("{report}");
    if !report.check.is_clean() || report.check.unacked_undelivered > 0 {
        std::process::exit(1);
    }
}
