//! `/healthz` (the process runs), `/readyz` (it can accept work: NATS connected and the stream
//! exists) and `/metrics`.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mahavishnu::{ErrorBody, ErrorCode};

/// Liveness: answers while the process can serve HTTP.
pub async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: NATS connected and the task stream in place. Not ready is an expected state
/// (start-up, broker outage), answered 503 with MHV-007 but not logged as a server error:
/// probes would flood the log.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let connected = state.nats_connected();
    let stream = state.stream_ready();
    if connected && stream {
        return Json(serde_json::json!({ "status": "ready", "nats": "connected", "stream": "ok" }))
            .into_response();
    }
    let body = ErrorBody::new(
        ErrorCode::BrokerUnavailable,
        format!(
            "not ready: nats {}, stream {}",
            if connected {
                "connected"
            } else {
                "disconnected"
            },
            if stream { "ok" } else { "missing" }
        ),
    );
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// Prometheus text exposition.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics().render(),
    )
}

/// 404 for unknown routes, in the same error shape as everything else.
pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::Validation, "no such route; see docs/api.md")
        .with_status(StatusCode::NOT_FOUND)
}
