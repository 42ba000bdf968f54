//! A TCP listener whose accepted sockets have `TCP_NODELAY`, for servers that write small
//! messages as they come (the gateway's frames, the fake LLM's stream).

use std::net::SocketAddr;

use axum::serve::{ListenerExt, TapIo};
use tokio::net::{TcpListener, TcpStream};

/// A listener that sets `TCP_NODELAY` on every socket it accepts.
pub type Listener = TapIo<TcpListener, fn(&mut TcpStream)>;

/// Binds `addr`.
///
/// # Errors
/// When the address cannot be bound.
pub async fn listen(addr: SocketAddr) -> std::io::Result<Listener> {
    Ok(TcpListener::bind(addr)
        .await?
        .tap_io(no_delay as fn(&mut TcpStream)))
}

/// Small writes go out at once: with Nagle's algorithm a message written before the previous
/// one's TCP ack waits for it, up to the peer's delayed-ack timer (40 ms on Linux). In the
/// gateway a delivery written after a ping waited so: ~5 % of answers 40 ms late at 1,000 msg/s
/// (docs/performance.md).
fn no_delay(tcp: &mut TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY on an accepted socket");
    }
}

#[cfg(test)]
mod tests {
    use axum::serve::Listener as _;

    use super::*;

    #[tokio::test]
    async fn accepted_sockets_write_without_nagles_delay() {
        let mut listener = listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await;
        assert!(accepted.nodelay().unwrap());
    }
}
