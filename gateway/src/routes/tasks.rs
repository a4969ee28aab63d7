//! The task API: create (publish to JetStream, answer once it acknowledged) and reads
//! (request-reply to the workers).

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody, PathRejection};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use chrono::Utc;
use mahavishnu::envelope::{self, headers, Envelope};
use mahavishnu::read_api::Reply;
use mahavishnu::task::{validate, TaskRequest};
use mahavishnu::topology;
use mahavishnu::ErrorCode;
use serde::Serialize;
use std::time::Instant;
use uuid::Uuid;

/// Longest `Idempotency-Key` accepted.
pub const IDEMPOTENCY_KEY_MAX: usize = 255;

/// The `202 Accepted` body.
#[derive(Debug, Serialize)]
pub struct Accepted {
    /// Task id (stable for a given caller and Idempotency-Key).
    pub id: Uuid,
    /// Always `queued`: JetStream holds the task; a worker will persist it.
    pub status: &'static str,
    /// True when JetStream recognised the message as a repeat of one it already holds.
    pub duplicate: bool,
    /// Where to read the task.
    pub location: String,
}

/// `POST /v1/tasks`.
pub async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let body = body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the body is larger than {} bytes",
                    state.settings().gateway.body_limit_bytes
                ),
            )
        }
        other => ApiError::new(
            ErrorCode::MalformedBody,
            format!("could not read the body: {other}"),
        ),
    })?;
    let idempotency_key = idempotency_key(&headers)?;
    let request = decode_body(&headers, &body)?;
    let now = Utc::now();
    let metrics = state.metrics();
    let task = match validate(&request, state.limits(), now) {
        Ok(t) => t,
        Err(details) => {
            metrics
                .task_creation_total
                .with_label_values(&["_invalid", "rejected"])
                .inc();
            return Err(ApiError::validation(details));
        }
    };
    // Commands come only from configuration: the task may only name what the registry has.
    if let Err(e) = mahavishnu::registry::plan_for(&state.settings().repositories, &task) {
        metrics
            .task_creation_total
            .with_label_values(&["_invalid", "rejected"])
            .inc();
        let field = e.field;
        return Err(ApiError::new(e.code, e.message.clone()).with_details(vec![
            mahavishnu::error::FieldError {
                field: field.to_owned(),
                problem: e.message,
            },
        ]));
    }
    // Only a validated repository name may become a label value.
    let repo_label = metrics.repository_label(&task.repository).to_owned();

    let key = envelope::api_key_for(
        &principal.0,
        &idempotency_key.unwrap_or_else(|| Uuid::now_v7().to_string()),
    );
    let id = envelope::task_id_for(&key);
    let ack = publish(&state, &principal, &key, request, now).await;
    let ack = match ack {
        Ok(ack) => ack,
        Err(e) => {
            metrics
                .task_creation_total
                .with_label_values(&[repo_label.as_str(), "unavailable"])
                .inc();
            return Err(e);
        }
    };
    metrics
        .task_creation_total
        .with_label_values(&[
            repo_label.as_str(),
            if ack.duplicate {
                "duplicate"
            } else {
                "accepted"
            },
        ])
        .inc();
    metrics
        .task_creation_duration_seconds
        .with_label_values(&[repo_label.as_str()])
        .observe(started.elapsed().as_secs_f64());
    tracing::debug!(task.id = %id, stream.seq = ack.sequence, duplicate = ack.duplicate, "task queued");

    let location = format!("/v1/tasks/{id}");
    let mut resp = (
        StatusCode::ACCEPTED,
        Json(Accepted {
            id,
            status: "queued",
            duplicate: ack.duplicate,
            location: location.clone(),
        }),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// Publishes and waits for JetStream's acknowledgement. Any failure is a 503 with MHV-007:
/// nothing is promised that JetStream did not store.
async fn publish(
    state: &AppState,
    principal: &Principal,
    key: &str,
    request: TaskRequest,
    now: chrono::DateTime<Utc>,
) -> Result<async_nats::jetstream::publish::PublishAck, ApiError> {
    let metrics = state.metrics();
    let fail = |reason: &'static str, e: &dyn std::fmt::Display| {
        metrics
            .publish_failures_total
            .with_label_values(&[reason])
            .inc();
        tracing::warn!(reason, error = %e, "publish not acknowledged; answering 503");
        ApiError::new(
            ErrorCode::BrokerUnavailable,
            "the task was not queued: the message broker did not acknowledge it",
        )
    };
    // Fail fast while disconnected rather than buffering a publish we cannot confirm.
    if !state.nats_connected() {
        return Err(fail("disconnected", &"NATS connection is down"));
    }
    let env = Envelope {
        v: 1,
        principal: principal.0.clone(),
        accepted_at: now,
        request,
    };
    let payload = envelope::encode_envelope(&env).map_err(|e| {
        tracing::error!(error = %e, "encoding envelope");
        ApiError::new(ErrorCode::Internal, "could not encode the task")
    })?;
    let publish = PublishMessage::build()
        .payload(payload.into())
        .message_id(key)
        .expected_stream(&state.settings().nats.stream.name)
        .header(headers::CONTENT_TYPE, envelope::CONTENT_TYPE_ENVELOPE);
    let ack_future = state
        .js()
        .send_publish(topology::SUBJECT_TASKS_SUBMIT, publish)
        .await
        .map_err(|e| match e.kind() {
            PublishErrorKind::MaxPayloadExceeded => ApiError::new(
                ErrorCode::PayloadTooLarge,
                "the task is larger than the broker accepts",
            ),
            _ => fail("send", &e),
        })?;
    ack_future.await.map_err(|e| {
        let reason = match e.kind() {
            PublishErrorKind::TimedOut => "ack_timeout",
            PublishErrorKind::StreamNotFound => "stream_not_found",
            PublishErrorKind::BrokenPipe => "broken_pipe",
            _ => "ack_error",
        };
        fail(reason, &e)
    })
}

/// `GET /v1/tasks/{id}`.
pub async fn get(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(id)?;
    read::<mahavishnu::task::Task>(&state, topology::SUBJECT_READ_TASK, id.to_string().into()).await
}

/// `GET /v1/tasks/{id}/audit`.
pub async fn audit(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(id)?;
    read::<Vec<mahavishnu::task::AuditEntry>>(
        &state,
        topology::SUBJECT_READ_AUDIT,
        id.to_string().into(),
    )
    .await
}

/// `GET /v1/tasks/{id}/runs`: the task's execution attempts, oldest first.
pub async fn runs(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(id)?;
    read::<Vec<mahavishnu::task::TaskRun>>(
        &state,
        topology::SUBJECT_READ_RUNS,
        id.to_string().into(),
    )
    .await
}

/// Optional body of `POST /v1/tasks/{id}/cancel`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    /// Why (kept in the audit row; at most 500 characters).
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /v1/tasks/{id}/cancel`: a queued task never starts; a running one has its process
/// group stopped (SIGTERM, then SIGKILL after `execution.kill_grace_ms`) by the worker running
/// it. Answered by a worker once the cancellation is committed. Idempotent.
pub async fn cancel(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(id)?;
    let body: CancelBody = if body.iter().all(u8::is_ascii_whitespace) {
        CancelBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                ErrorCode::MalformedBody,
                format!("the body must be empty or {{\"reason\": \"...\"}}: {e}"),
            )
        })?
    };
    if body
        .reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > 500)
    {
        return Err(ApiError::new(
            ErrorCode::Validation,
            "reason must be at most 500 characters",
        ));
    }
    let req = mahavishnu::read_api::CancelRequest {
        task_id: id,
        actor: format!("api:{}", principal.0),
        reason: body.reason.map(|r| r.replace('\0', "")),
    };
    let payload = serde_json::to_vec(&req).unwrap_or_default();
    read::<mahavishnu::read_api::Cancelled>(&state, topology::SUBJECT_TASK_CANCEL, payload.into())
        .await
}

async fn read<T: serde::de::DeserializeOwned + Serialize>(
    state: &AppState,
    subject: &'static str,
    payload: Bytes,
) -> Result<Response, ApiError> {
    use async_nats::RequestErrorKind;
    if !state.nats_connected() {
        return Err(ApiError::new(
            ErrorCode::BrokerUnavailable,
            "the message broker is unreachable",
        ));
    }
    let timeout = mahavishnu::config::ms(state.settings().nats.request_timeout_ms);
    let reply = tokio::time::timeout(timeout, state.nats().request(subject, payload))
        .await
        .map_err(|_| ApiError::new(ErrorCode::WorkerUnavailable, "no worker answered in time"))?
        .map_err(|e| match e.kind() {
            RequestErrorKind::NoResponders => {
                ApiError::new(ErrorCode::WorkerUnavailable, "no worker is running")
            }
            RequestErrorKind::TimedOut => {
                ApiError::new(ErrorCode::WorkerUnavailable, "no worker answered in time")
            }
            RequestErrorKind::Other
            | RequestErrorKind::InvalidSubject
            | RequestErrorKind::MaxPayloadExceeded => {
                tracing::warn!(error = %e, "read request failed");
                ApiError::new(ErrorCode::BrokerUnavailable, "the read request failed")
            }
        })?;
    match serde_json::from_slice::<Reply<T>>(&reply.payload) {
        Ok(Reply::Ok(v)) => Ok(Json(v).into_response()),
        Ok(Reply::Error(body)) => Err(ApiError::from_body(body)),
        Err(e) => {
            tracing::error!(error = %e, "worker reply did not decode");
            Err(ApiError::new(
                ErrorCode::Internal,
                "a worker sent an unreadable reply",
            ))
        }
    }
}

fn parse_id(raw: Result<Path<String>, PathRejection>) -> Result<Uuid, ApiError> {
    let raw = raw.map(|Path(p)| p).unwrap_or_default();
    Uuid::parse_str(&raw).map_err(|_| {
        ApiError::new(ErrorCode::Validation, "the task id must be a UUID")
            .with_status(StatusCode::BAD_REQUEST)
    })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            ErrorCode::Validation,
            format!("Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters"),
        )
        .with_status(StatusCode::BAD_REQUEST)
    };
    let s = v.to_str().map_err(|_| bad())?;
    if s.is_empty() || s.len() > IDEMPOTENCY_KEY_MAX || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(s.to_owned()))
}

fn decode_body(headers: &HeaderMap, body: &[u8]) -> Result<TaskRequest, ApiError> {
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
    match media.as_deref() {
        Some("application/json") => serde_json::from_slice(body).map_err(|e| {
            ApiError::new(ErrorCode::MalformedBody, format!("invalid JSON task: {e}"))
        }),
        Some("application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack") => {
            rmp_serde::from_slice(body).map_err(|e| {
                ApiError::new(
                    ErrorCode::MalformedBody,
                    format!("invalid MessagePack task: {e}"),
                )
            })
        }
        Some(other) => Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!("Content-Type {other:?} is not supported"),
        )),
        None => Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "Content-Type is required (application/json or application/msgpack)",
        )),
    }
}
