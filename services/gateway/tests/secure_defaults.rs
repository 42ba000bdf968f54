//! The gateway binary refuses insecure settings outside dev mode: it exits non-zero, before
//! touching the network, with a message naming what to set.

use std::process::{Command, Output};

fn gateway(envs: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_colloquy-gateway"))
        .env_clear()
        .envs(envs.iter().copied())
        .args(args)
        // Nothing listens here: if the gateway got past its checks it would still not serve.
        .env("GATEWAY_LISTEN", "127.0.0.1:0")
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
