//! `colloquy-probe URL`: the container health check. Images built `FROM scratch` (or distroless)
//! have no shell, curl or redis-cli, so each carries this one small std-only binary.
//!
//! - `http://HOST:PORT/PATH`: GET, healthy on a 2xx status line
//! - `redis://HOST:PORT`: PING, healthy on `+PONG`
//! - `tcp://HOST:PORT`: healthy when a connection is accepted
//!
//! Exit status 0 when healthy, 1 otherwise (with the reason on stderr), as Docker's
//! `HEALTHCHECK` expects. Every step is bounded by a 3 s timeout.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::process::ExitCode;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let Some(url) = std::env::args().nth(1) else {
        eprintln!(
            "usage: colloquy-probe http://HOST:PORT/PATH | redis://HOST:PORT | tcp://HOST:PORT"
        );
        return ExitCode::from(2);
    };
    match probe(&url) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("unhealthy: {url}: {reason}");
            ExitCode::FAILURE
        }
    }
}

fn probe(url: &str) -> Result<(), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "no scheme".to_owned())?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    match scheme {
        "tcp" => connect(authority).map(drop),
        "redis" => {
            let reply = exchange(authority, b"PING\r\n")?;
            if reply.starts_with("+PONG") {
                Ok(())
            } else {
                Err(format!("PING answered {:?}", first_line(&reply)))
            }
        }
        "http" => {
            let request = format!(
                "GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: colloquy-probe\r\n\r\n"
            );
            let reply = exchange(authority, request.as_bytes())?;
            let status = first_line(&reply);
            let code = status.split(' ').nth(1).unwrap_or("");
            if code.len() == 3 && code.starts_with('2') {
                Ok(())
            } else {
                Err(format!("status line {status:?}"))
            }
        }
        other => Err(format!("unsupported scheme {other:?}")),
    }
}

fn connect(authority: &str) -> Result<TcpStream, String> {
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to no address"))?;
    let stream =
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    Ok(stream)
}

/// Sends `request` and reads the first bytes of the answer (enough for a status line).
fn exchange(authority: &str, request: &[u8]) -> Result<String, String> {
    let mut stream = connect(authority)?;
    stream
        .write_all(request)
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0_u8; 256];
    let mut len = 0;
    while len < buf.len() {
        match stream.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if buf[..len].contains(&b'\n') {
                    break;
                }
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
}

fn first_line(reply: &str) -> &str {
    reply.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-shot server on a free port that answers the first request with `reply`.
    fn serve_once(reply: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0_u8; 512];
                let _ = s.read(&mut buf);
                let _ = s.write_all(reply.as_bytes());
            }
        });
        addr.to_string()
    }

    #[test]
    fn http_is_healthy_only_on_2xx() {
        let ok = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        assert_eq!(probe(&format!("http://{ok}/health")), Ok(()));
        let down = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let err = probe(&format!("http://{down}/ready")).expect_err("503 is unhealthy");
        assert!(err.contains("503"), "{err}");
    }

    #[test]
    fn redis_is_healthy_only_on_pong() {
        let pong = serve_once("+PONG\r\n");
        assert_eq!(probe(&format!("redis://{pong}")), Ok(()));
        let loading = serve_once("-LOADING Redis is loading the dataset in memory\r\n");
        assert!(probe(&format!("redis://{loading}")).is_err());
    }

    #[test]
    fn closed_ports_and_unknown_schemes_are_unhealthy() {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        assert!(probe(&format!("tcp://127.0.0.1:{port}")).is_err());
        assert!(probe("ftp://127.0.0.1:21").is_err());
        assert!(probe("127.0.0.1:80").is_err());
    }
}
