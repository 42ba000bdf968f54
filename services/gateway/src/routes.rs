//! HTTP routes: token issue, WebSocket upgrade, health, readiness, metrics and the chat page.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fred::prelude::*;
use futures::StreamExt;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;

use colloquy_core::labels::RefusedReason;
use colloquy_core::wire::EventId;
use colloquy_core::{UserId, kafka};

use crate::auth::{AuthError, constant_time_eq};
use crate::close;
use crate::events::ConnectionRefused;
use crate::session::{self, Accepted};
use crate::state::AppState;

const CHAT_PAGE: &str = include_str!("../static/index.html");

/// The gateway's routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(chat_page))
        .route("/token", post(issue_token))
        .route("/ws", get(websocket))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route(
            "/metrics",
            get(|| async { colloquy_core::admin::metrics_response() }),
        )
        .with_state(state)
}

async fn chat_page() -> Html<&'static str> {
    Html(CHAT_PAGE)
}

#[derive(Debug, Deserialize)]
struct TokenParams {
    userid: Option<String>,
}

fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn issue_token(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(params): Query<TokenParams>,
) -> Response {
    if let Some(admin) = &state.config.admin_token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let allowed = presented
            .is_some_and(|p| constant_time_eq(p.as_bytes(), admin.expose_secret().as_bytes()));
        if !allowed {
            return json_error(
                StatusCode::UNAUTHORIZED,
                "issuing tokens needs the admin bearer token",
            );
        }
    }
    let Some(Ok(user)) = params.userid.as_deref().map(UserId::parse) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "userid must be 3 to 64 characters of A-Z, a-z, 0-9, '_' or '-'",
        );
    };
    match state.tokens.issue(&user) {
        Ok(token) => Json(json!({
            "token": token,
            "userid": user,
            "expires_in": state.tokens.ttl_secs(),
        }))
        .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "token signing failed");
            json_error(StatusCode::INTERNAL_SERVER_ERROR, "cannot sign token")
        }
    }
}

#[derive(Debug, Deserialize)]
struct WsParams {
    userid: Option<String>,
    token: Option<String>,
    after: Option<String>,
}

async fn websocket(
    State(state): State<Arc<AppState>>,
    Query(params): Query<WsParams>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let limit = state.config.max_frame_bytes;
    let ws = ws
        .max_frame_size(limit)
        .max_message_size(limit)
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    // Refusals are sent as close frames after the upgrade, because a browser cannot read an HTTP status.
    match admit(&state, &params, &headers) {
        Ok(accepted) => ws.on_upgrade(move |socket| {
            let sessions = state.sessions.clone();
            sessions.track_future(async move {
                let (sink, stream) = socket.split();
                session::run(sink, stream, state, accepted).await;
            })
        }),
        Err(reason) => {
            ConnectionRefused {
                userid: params.userid.as_deref(),
                reason: if reason == "origin not allowed" {
                    RefusedReason::Origin
                } else {
                    RefusedReason::Auth
                },
                detail: reason,
            }
            .emit();
            ws.on_upgrade(move |socket| async move {
                let (mut sink, mut stream) = socket.split();
                session::close_and_linger(&mut sink, &mut stream, close::POLICY, reason).await;
            })
        }
    }
}

/// Checks a `/ws` request: its origin, userid, token and cursor. The error is the close reason.
fn admit(
    state: &AppState,
    params: &WsParams,
    headers: &HeaderMap,
) -> Result<Accepted, &'static str> {
    if !origin_allowed(&state.config, headers) {
        return Err("origin not allowed");
    }
    let user = params
        .userid
        .as_deref()
        .ok_or("missing userid")
        .and_then(|u| UserId::parse(u).map_err(|_| "invalid userid"))?;
    let exp = state
        .tokens
        .verify(params.token.as_deref(), &user)
        .map_err(|e| match e {
            AuthError::Missing => "missing token",
            AuthError::Expired => "token expired",
            AuthError::Invalid => "invalid token",
            AuthError::WrongUser => "token does not belong to this userid",
        })?;
    let after = match params.after.as_deref() {
        None => None,
        Some(a) => Some(EventId::parse(a).ok_or("after is not an event id")?),
    };
    Ok(Accepted {
        user,
        after,
        token_expires_ms: Some(exp.saturating_mul(1000)),
    })
}

/// Whether a `/ws` request may proceed given its `Origin`: no header (a non-browser client),
/// the same origin as the request's `Host`, a configured origin, or (in dev mode) localhost.
fn origin_allowed(config: &crate::config::GatewayConfig, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim_end_matches('/');
    if config
        .allowed_origins
        .iter()
        .any(|o| o.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let Some(authority) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let same_origin = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|host| host.eq_ignore_ascii_case(authority));
    same_origin || (config.dev && is_localhost(authority))
}

fn is_localhost(authority: &str) -> bool {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    host.eq_ignore_ascii_case("localhost") || host == "127.0.0.1" || host == "::1"
}

async fn health() -> &'static str {
    "ok"
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let kafka_ok = kafka::is_reachable(&state.producer, Duration::from_secs(1)).await;
    // Every connection of the pool, not just the one a PING happens to use: after Redis was
    // LOADING, fred brings the pool's connections up one by one.
    let redis_ok = state.redis.clients().iter().all(ClientLike::is_connected)
        && matches!(
            tokio::time::timeout(Duration::from_secs(1), state.redis.ping::<String>(None)).await,
            Ok(Ok(_))
        );
    // Deliveries need the subscriber too: until it is connected every socket would get 1013.
    let deliveries_ok = state.fanout.is_connected();
    let body = Json(json!({ "kafka": kafka_ok, "redis": redis_ok, "deliveries": deliveries_ok }));
    if kafka_ok && redis_ok && deliveries_ok && !state.shutdown.is_cancelled() {
        (StatusCode::OK, body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use colloquy_core::config::{KafkaConfig, RedisConfig};
    use colloquy_core::names::Names;

    use crate::auth::TokenService;
    use crate::config::GatewayConfig;
    use crate::fanout::Fanout;
    use crate::rate_limit::{Gcra, RateLimiter};

    /// State whose Kafka and Redis point at closed ports: routes that need neither still work,
    /// and readiness reports both down.
    async fn state(admin: Option<&str>) -> Arc<AppState> {
        let mut cfg = GatewayConfig::local("127.0.0.1:0".parse().unwrap());
        cfg.admin_token = admin.map(|a| secrecy::SecretString::from(a.to_owned()));
        let kafka = KafkaConfig::local("127.0.0.1:1");
        let redis = RedisConfig::local("redis://127.0.0.1:1");
        let names = Names::default();
        let producer = kafka::producer(&kafka, "test").unwrap();
        let pool = colloquy_core::redis::pool(&redis).await.unwrap();
        let sub = colloquy_core::redis::subscriber(&redis).await.unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let fanout = Fanout::start(sub, names.clone(), 8, shutdown.clone());
        let limiter = RateLimiter::new(
            Gcra::per_period(10, Duration::from_secs(60)),
            pool.clone(),
            names.clone(),
        );
        let tokens = TokenService::new(&cfg.auth_secret, 60).unwrap();
        Arc::new(AppState::new(
            cfg, names, producer, pool, tokens, limiter, fanout, shutdown,
        ))
    }

    async fn call(app: Router, req: Request<Body>) -> (StatusCode, String) {
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn health_metrics_and_chat_page() {
        let app = router(state(None).await);
        assert_eq!(
            call(
                app.clone(),
                Request::get("/health").body(Body::empty()).unwrap()
            )
            .await,
            (StatusCode::OK, "ok".into())
        );
        let (status, page) =
            call(app.clone(), Request::get("/").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert!(page.contains("<html") || page.contains("<!doctype") || page.contains("<!DOCTYPE"));
        let (status, _) = call(app, Request::get("/metrics").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn token_issue_validates_userid_and_verifies() {
        let state = state(None).await;
        let app = router(Arc::clone(&state));
        let (status, body) = call(
            app.clone(),
            Request::post("/token?userid=dana")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let token = v["token"].as_str().unwrap();
        assert!(
            state
                .tokens
                .verify(Some(token), &UserId::parse("dana").unwrap())
                .is_ok()
        );
        for bad in [
            "/token",
            "/token?userid=d",
            "/token?userid=a%3Ab",
            "/token?userid=%7Bx%7Dyz",
        ] {
            let (status, _) =
                call(app.clone(), Request::post(bad).body(Body::empty()).unwrap()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[tokio::test]
    async fn token_issue_needs_the_admin_token_when_configured() {
        let app = router(state(Some("adm")).await);
        let (status, _) = call(
            app.clone(),
            Request::post("/token?userid=erin")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let wrong = Request::post("/token?userid=erin")
            .header("authorization", "Bearer nope")
            .body(Body::empty())
            .unwrap();
        assert_eq!(call(app.clone(), wrong).await.0, StatusCode::UNAUTHORIZED);
        let longer = Request::post("/token?userid=erin")
            .header("authorization", "Bearer adm2")
            .body(Body::empty())
            .unwrap();
        assert_eq!(call(app.clone(), longer).await.0, StatusCode::UNAUTHORIZED);
        let right = Request::post("/token?userid=erin")
            .header("authorization", "Bearer adm")
            .body(Body::empty())
            .unwrap();
        assert_eq!(call(app, right).await.0, StatusCode::OK);
    }

    fn origin_headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, host.parse().unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, o.parse().unwrap());
        }
        h
    }

    #[test]
    fn origins_are_checked_against_the_allow_list() {
        let mut cfg = GatewayConfig::local("127.0.0.1:0".parse().unwrap());
        cfg.dev = false;
        cfg.allowed_origins = vec!["https://chat.example.com".into()];
        let host = "gw.example.com";
        let allowed =
            |o: Option<&str>, cfg: &GatewayConfig| origin_allowed(cfg, &origin_headers(o, host));
        assert!(allowed(None, &cfg), "no Origin: not a browser");
        assert!(allowed(Some("https://chat.example.com"), &cfg));
        assert!(allowed(Some("https://gw.example.com"), &cfg), "same origin");
        assert!(!allowed(Some("https://evil.example"), &cfg));
        assert!(
            !allowed(Some("http://localhost:3000"), &cfg),
            "localhost only in dev"
        );
        assert!(!allowed(Some("null"), &cfg));
        cfg.dev = true;
        assert!(allowed(Some("http://localhost:3000"), &cfg));
        assert!(allowed(Some("http://127.0.0.1:8080"), &cfg));
        assert!(allowed(Some("http://[::1]:8080"), &cfg));
        assert!(!allowed(Some("http://localhost.evil.example"), &cfg));
        assert!(!allowed(Some("https://evil.example"), &cfg));
    }

    #[tokio::test]
    async fn ready_reports_unreachable_dependencies_and_ws_needs_an_upgrade() {
        let app = router(state(None).await);
        let (status, body) = call(
            app.clone(),
            Request::get("/ready").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("\"kafka\":false") && body.contains("\"redis\":false"),
            "{body}"
        );
        let (status, _) = call(
            app,
            Request::get("/ws?userid=frank&token=x")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert!(
            status.is_client_error(),
            "a plain GET is not an upgrade: {status}"
        );
    }
}
