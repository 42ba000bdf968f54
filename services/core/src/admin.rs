//! The small HTTP server of the Kafka services: `GET /metrics` (Prometheus), `GET /health`
//! (the process is alive) and `GET /ready` (it can do its job: for a consumer, it holds
//! partitions).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Says whether the service is ready, or why not.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The Prometheus exposition of this process, as served on every `/metrics`.
#[must_use]
pub fn metrics_response() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::recorder().render(),
    )
        .into_response()
}

/// The admin routes, for tests through `tower::ServiceExt::oneshot`.
pub fn router(ready: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(|| async { metrics_response() }))
        .route("/health", get(|| async { "ok" }))
        .route(
            "/ready",
            get(move || {
                let ready = Arc::clone(&ready);
                async move {
                    match ready() {
                        Ok(()) => (StatusCode::OK, "ready".to_owned()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        )
}

/// Binds `addr` and serves the admin routes until `shutdown`. Returns the bound address.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    ready: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(ready);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn status(app: Router, path: &str) -> StatusCode {
        app.oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn ready_reflects_the_readiness_check() {
        let ready: Readiness = Arc::new(|| Err("relay holds no partitions".into()));
        assert_eq!(
            status(router(ready), "/ready").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let ready: Readiness = Arc::new(|| Ok(()));
        assert_eq!(
            status(router(Arc::clone(&ready)), "/ready").await,
            StatusCode::OK
        );
        assert_eq!(status(router(ready), "/health").await, StatusCode::OK);
    }
}
