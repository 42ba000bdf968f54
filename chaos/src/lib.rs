//! Colloquy's chaos scenarios: the whole system as real processes on 127.0.0.1, a steady load of
//! simulated users, and one component killed with SIGKILL and restarted mid-run. The delivery
//! checker then says whether anything a client was acked for was lost, duplicated or invented.
//!
//! - [`binaries`]: where the service binaries, tansu, redis-server and nginx are found;
//! - [`stack`]: the processes ([`Stack`]): each one's typed configuration rendered into its
//!   environment, start, kill -9, restart, wait until ready (processes and ports come from
//!   [`colloquy_testkit::process`]);
//! - [`nginx`]: the edge configuration written for a stack;
//! - [`scenarios`]: the scenarios and their run loop;
//! - [`report`]: what a scenario found ([`ScenarioReport`]) and its table line;
//! - [`soak`]: open-loop load for a long while with faults on a schedule, and its verdict;
//! - [`bench`](mod@bench): the benchmark matrix (rates × LLM latency × `MAX_IN_FLIGHT`) with CPU per process;
//! - [`cpu`]: CPU time of processes from `/proc`.

pub mod bench;
pub mod binaries;
pub mod cpu;
pub mod nginx;
pub mod report;
pub mod scenarios;
pub mod soak;
pub mod stack;

pub use report::ScenarioReport;
pub use scenarios::{Scenario, ScenarioConfig};
pub use soak::{SoakConfig, SoakReport};
pub use stack::{Component, Stack, StackOptions, Storage};
