//! The nginx edge of a chaos stack: `infra/nginx.conf` itself, rendered on the stack's ports.
//!
//! There is one edge configuration. This renderer replaces its `listen` line and its two
//! upstream `server` lines (the tokens below) and keeps everything else, so every edge rule
//! (limits, hidden internal endpoints, logs without query strings, timeouts) is the one the
//! local stack and production run. Paths in the file are relative to nginx's prefix: the stack
//! directory, which must hold `logs/`, `pids/` and `nginx/` ([`PREFIX_DIRS`]); [`prepare`]
//! makes them and writes the configuration.

use std::path::{Path, PathBuf};

use colloquy_testkit::process::find_program;

/// The edge configuration, as committed.
pub const TEMPLATE: &str = include_str!("../../infra/nginx.conf");

/// Directories nginx expects under its prefix.
pub const PREFIX_DIRS: [&str; 3] = ["logs", "pids", "nginx"];

const LISTEN: &str = "listen       127.0.0.1:8080;";
const UPSTREAMS: [&str; 2] = [
    "server 127.0.0.1:8001 max_fails=1 fail_timeout=2s;",
    "server 127.0.0.1:8002 max_fails=1 fail_timeout=2s;",
];

/// The edge's per-client-address limits: the committed ones by default; a load test whose
/// simulated users all come from 127.0.0.1 raises them ([`EdgeLimits::load_test`]), as
/// `scripts/stack.sh` does with `EDGE_SOCKETS_PER_ADDR`, `EDGE_TOKENS_PER_SEC`, `EDGE_TOKEN_BURST`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeLimits {
    pub sockets_per_addr: u32,
    pub tokens_per_sec: u32,
    pub token_burst: u32,
}

impl Default for EdgeLimits {
    /// The limits as committed in `infra/nginx.conf`.
    fn default() -> Self {
        Self {
            sockets_per_addr: 256,
            tokens_per_sec: 20,
            token_burst: 200,
        }
    }
}

impl EdgeLimits {
    /// Room for 10,000 users from one address, connecting at once.
    #[must_use]
    pub fn load_test() -> Self {
        Self {
            sockets_per_addr: 20_000,
            tokens_per_sec: 10_000,
            token_burst: 20_000,
        }
    }

    /// The template lines that hold the limits, and what they become.
    fn lines(self) -> [(&'static str, String); 3] {
        [
            (
                "zone=token_per_addr:10m  rate=20r/s;",
                format!("zone=token_per_addr:10m  rate={}r/s;", self.tokens_per_sec),
            ),
            (
                "zone=token_per_addr burst=200 nodelay;",
                format!("zone=token_per_addr burst={} nodelay;", self.token_burst),
            ),
            (
                "limit_conn          ws_per_addr 256;",
                format!("limit_conn          ws_per_addr {};", self.sockets_per_addr),
            ),
        ]
    }
}

/// Why the template could not be rendered.
#[derive(Debug, PartialEq, Eq)]
pub enum RenderError {
    MissingToken(&'static str),
    NoGateways,
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MissingToken(t) => {
                write!(
                    f,
                    "infra/nginx.conf lost the line `{t}` that the renderer replaces"
                )
            }
            Self::NoGateways => f.write_str("an edge needs at least one gateway"),
        }
    }
}

impl std::error::Error for RenderError {}

/// `infra/nginx.conf` with nginx listening on `port` in front of `gateways`, with `limits`.
///
/// # Errors
/// When the template no longer holds a line it must replace, or `gateways` is empty.
pub fn render(port: u16, gateways: &[u16], limits: EdgeLimits) -> Result<String, RenderError> {
    if gateways.is_empty() {
        return Err(RenderError::NoGateways);
    }
    let limit_lines = limits.lines();
    for token in std::iter::once(LISTEN)
        .chain(UPSTREAMS)
        .chain(limit_lines.iter().map(|(from, _)| *from))
    {
        if !TEMPLATE.contains(token) {
            return Err(RenderError::MissingToken(token));
        }
    }
    let indent = "\n        ";
    let servers = gateways
        .iter()
        .map(|p| format!("server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;"))
        .collect::<Vec<_>>()
        .join(indent);
    let mut conf = TEMPLATE
        .replace(LISTEN, &format!("listen       127.0.0.1:{port};"))
        .replace(
            &format!("{}{indent}{}", UPSTREAMS[0], UPSTREAMS[1]),
            &servers,
        );
    for (from, to) in &limit_lines {
        conf = conf.replace(from, to);
    }
    Ok(conf)
}

/// nginx, when installed (Debian puts it in `/usr/sbin`, often not on a user's `PATH`).
#[must_use]
pub fn binary() -> Option<PathBuf> {
    find_program(
        "nginx",
        &[Path::new("/usr/sbin"), Path::new("/usr/local/sbin")],
    )
}

/// Where [`prepare`] puts the configuration, under the prefix.
pub const CONF: &str = "nginx/nginx.conf";
/// nginx's error log under the prefix (the access log is named by the template: `logs/`).
pub const ERROR_LOG: &str = "logs/nginx-error.log";

/// Makes `prefix` ready for nginx on `port` in front of `gateways` (its directories and the
/// rendered configuration) and returns nginx's arguments: in the foreground, on that prefix.
///
/// # Errors
/// When the configuration does not render or a file cannot be written.
pub fn prepare(
    prefix: &Path,
    port: u16,
    gateways: &[u16],
    limits: EdgeLimits,
) -> anyhow::Result<Vec<String>> {
    for sub in PREFIX_DIRS {
        std::fs::create_dir_all(prefix.join(sub))?;
    }
    let conf = prefix.join(CONF);
    std::fs::write(&conf, render(port, gateways, limits)?)?;
    Ok(vec![
        "-p".into(),
        format!("{}/", prefix.display()),
        "-c".into(),
        conf.display().to_string(),
        "-e".into(),
        prefix.join(ERROR_LOG).display().to_string(),
        "-g".into(),
        "daemon off;".into(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_gateway_and_listens_on_the_port() {
        let conf = render(18080, &[18001, 18002, 18003], EdgeLimits::default()).unwrap();
        assert!(conf.contains("listen       127.0.0.1:18080;"));
        for p in [18001, 18002, 18003] {
            assert!(
                conf.contains(&format!("server 127.0.0.1:{p} max_fails=1")),
                "{p}"
            );
        }
        assert!(!conf.contains("127.0.0.1:8080;") && !conf.contains("127.0.0.1:8001"));
    }

    #[test]
    fn keeps_the_edge_rules() {
        let conf = render(18080, &[18001], EdgeLimits::default()).unwrap();
        for rule in [
            "limit_req ",
            "limit_conn ",
            "return 404;",
            "$request_method $uri",
        ] {
            assert!(conf.contains(rule), "{rule}");
        }
        assert!(!conf.contains("\"$request\""), "no query strings in logs");
    }

    #[test]
    fn refuses_no_gateways() {
        assert_eq!(
            render(1, &[], EdgeLimits::default()),
            Err(RenderError::NoGateways)
        );
    }

    #[test]
    fn committed_limits_stay_and_a_load_test_raises_them() {
        let committed = render(18080, &[18001], EdgeLimits::default()).unwrap();
        assert!(committed.contains("ws_per_addr 256;"));
        assert!(committed.contains("rate=20r/s;") && committed.contains("burst=200 nodelay;"));
        let load = render(18080, &[18001], EdgeLimits::load_test()).unwrap();
        assert!(load.contains("ws_per_addr 20000;"), "{load}");
        assert!(load.contains("rate=10000r/s;") && load.contains("burst=20000 nodelay;"));
        assert!(!load.contains("ws_per_addr 256;"));
    }
}
