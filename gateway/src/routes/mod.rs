//! HTTP routes: the task API under `/v1`, and the operational endpoints.

pub mod health;
pub mod tasks;

use crate::state::AppState;
use axum::routing::{get, post};
use axum::Router;

/// Builds the router (without server-level layers; see [`crate::server`]).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/tasks", post(tasks::create))
        .route("/v1/tasks/{id}", get(tasks::get))
        .route("/v1/tasks/{id}/audit", get(tasks::audit))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(health::not_found)
        .with_state(state)
}
