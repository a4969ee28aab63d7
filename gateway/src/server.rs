//! Serving: hyper's HTTP/1 connection builder with a header-read timeout (axum's own `serve`
//! has none, so a client trickling headers could hold a connection forever), per-request
//! guards, and graceful shutdown that lets in-flight requests finish.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use mahavishnu::ErrorCode;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Wraps the router with the layers every route gets: in-flight limit, request deadline,
/// request metrics, body limit and panic capture.
pub fn app(state: AppState) -> Router {
    let g = &state.settings().gateway;
    let guard = Guard {
        permits: Arc::new(Semaphore::new(g.max_in_flight_requests)),
        deadline: Duration::from_millis(g.request_timeout_ms),
    };
    crate::routes::router(state.clone())
        .layer(axum::extract::DefaultBodyLimit::max(g.body_limit_bytes))
        .layer(axum::middleware::from_fn_with_state(
            (state, guard),
            guard_request,
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                tracing::error!("handler panicked");
                ApiError::new(ErrorCode::Internal, "internal error").into_response()
            },
        ))
}

#[derive(Clone)]
struct Guard {
    permits: Arc<Semaphore>,
    deadline: Duration,
}

async fn guard_request(
    State((state, guard)): State<(AppState, Guard)>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let resp = match guard.permits.clone().try_acquire_owned() {
        Err(_) => {
            ApiError::new(ErrorCode::Overloaded, "too many requests in flight").into_response()
        }
        Ok(_permit) => match tokio::time::timeout(guard.deadline, next.run(req)).await {
            Ok(r) => r,
            Err(_) => ApiError::new(ErrorCode::Overloaded, "the request did not finish in time")
                .into_response(),
        },
    };
    state
        .metrics()
        .http_requests_total
        .with_label_values(&[&route, resp.status().as_str()])
        .inc();
    resp
}

/// Serves `app` on `listener` until `shutdown` resolves, then waits up to `drain` for open
/// connections to finish their current request.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    drain: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(drain) => tracing::warn!("connections still open after drain timeout; closing"),
    }
}
