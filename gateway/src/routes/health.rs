//! `/healthz` (the process runs), `/readyz` (it can accept work: NATS connected and the stream
//! exists) and `/metrics`.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use mahavishnu::ErrorCode;

/// Liveness: answers while the process can serve HTTP.
pub async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: NATS connected and the task stream in place.
pub async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let connected = state.nats_connected();
    let stream = state.stream_ready();
    if connected && stream {
        Ok(Json(
            serde_json::json!({ "status": "ready", "nats": "connected", "stream": "ok" }),
        ))
    } else {
        Err(ApiError::new(
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
        ))
    }
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
