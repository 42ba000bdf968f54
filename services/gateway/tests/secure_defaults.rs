//! The gateway binary refuses insecure settings outside dev mode: it exits non-zero, before
//! touching the network, with a message naming what to set.

use std::process::{Command, Output};

fn gateway(envs: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_colloquy-gateway"))
        .env_clear()
        .envs(envs.iter().copied())
        .args(args)
        // Closed ports for Kafka and Redis, and an address that cannot be bound (TEST-NET-1):
        // a gateway that gets past its checks fails at `bind`, and touches nothing else.
        .env("GATEWAY_LISTEN", "192.0.2.1:1")
        .env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .env("RUST_LOG", "off")
        .output()
        .expect("run the gateway binary")
}

fn refused(out: &Output, naming: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {stderr}");
    assert!(stderr.contains(naming), "no mention of {naming}: {stderr}");
}

#[test]
fn no_auth_secret_and_no_dev_flag_exits_non_zero_naming_auth_secret() {
    refused(&gateway(&[], &[]), "AUTH_SECRET");
    // A falsey COLLOQUY_DEV is not dev mode.
    refused(&gateway(&[("COLLOQUY_DEV", "0")], &[]), "AUTH_SECRET");
}

#[test]
fn a_short_secret_is_refused() {
    refused(&gateway(&[("AUTH_SECRET", "short")], &[]), "AUTH_SECRET");
}

#[test]
fn an_open_token_endpoint_is_refused() {
    let secret = "a-production-secret-of-at-least-32-bytes";
    refused(
        &gateway(&[("AUTH_SECRET", secret)], &[]),
        "AUTH_ADMIN_TOKEN",
    );
}

#[test]
fn dev_mode_accepts_the_defaults_with_the_variable_or_the_flag() {
    for (envs, args) in [
        (&[("COLLOQUY_DEV", "1")][..], &[][..]),
        (&[][..], &["--dev"][..]),
    ] {
        let out = gateway(envs, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Past the checks: it fails only where the test made it fail, at bind.
        assert!(!out.status.success());
        assert!(stderr.contains("cannot listen on 192.0.2.1:1"), "{stderr}");
        assert!(!stderr.contains("AUTH_SECRET"), "{stderr}");
    }
}
