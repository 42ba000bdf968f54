//! Ports for the processes of a stack.
//!
//! A killed process is restarted on the same port, so the port must stay free while it is down.
//! A port picked by binding port 0 comes from the kernel's ephemeral range, the same range the
//! kernel draws from for the local end of every outgoing connection, and a scenario opens
//! hundreds of those during the downtime (reconnecting clients, producers, Redis clients): one of
//! them may take the port and the restart fails with "address in use". So listening ports are
//! drawn below the ephemeral range, and only fall back to
//! [`colloquy_testkit::process::free_port`] when that range is too small to draw from.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{LazyLock, Mutex};

/// Lowest port handed out.
const LOW: u16 = 10_000;

/// Ports already handed out by this process (two stacks must never share one).
static GIVEN: LazyLock<Mutex<HashSet<u16>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// Start of the kernel's ephemeral port range (Linux), 32768 when it cannot be read.
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32_768)
}

/// A port on 127.0.0.1 that is free now and outside the ephemeral range when possible.
///
/// # Errors
/// When no port can be bound at all.
pub fn listen_port() -> std::io::Result<u16> {
    let high = ephemeral_start();
    if high > LOW + 1_000 {
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for _ in 0..200 {
            let port = rand::random_range(LOW..high);
            if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return Ok(port);
            }
        }
    }
    colloquy_testkit::process::free_port()
}
