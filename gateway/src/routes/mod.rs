//! HTTP routes: the task API under `/v1`, and the operational endpoints.

pub mod health;
pub mod tasks;
pub mod webhooks;

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use mahavishnu::ErrorCode;

/// Builds the router (without server-level layers; see [`crate::server`]).
pub fn router(state: AppState) -> Router {
    // Authentication runs before any handler extracts (and so reads) the body.
    let api = Router::new()
        .route("/v1/tasks", post(tasks::create))
        .route("/v1/tasks/{id}", get(tasks::get))
        .route("/v1/tasks/{id}/audit", get(tasks::audit))
        .route("/v1/tasks/{id}/runs", get(tasks::runs))
        .route("/v1/tasks/{id}/cancel", post(tasks::cancel))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(api)
        // Webhooks authenticate by signature, not by API key.
        .route("/v1/webhooks/{source}", post(webhooks::receive))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(health::not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Puts the caller's [`Principal`](crate::auth::Principal) in the request extensions, or answers 401.
async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let principal = state.keys().authenticate(req.headers())?;
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::Validation,
        "method not allowed on this route; see docs/api.md",
    )
    .with_status(StatusCode::METHOD_NOT_ALLOWED)
}
