//! Answers the gateway's reads over NATS (service `mhv-tasks`, queue group shared by every
//! replica). Replies are JSON [`mahavishnu::read_api::Reply`] values.

use crate::Ctx;
use async_nats::service::ServiceExt;
use bytes::Bytes;
use futures::StreamExt;
use mahavishnu::error::ErrorBody;
use mahavishnu::read_api::Reply;
use mahavishnu::task::{AuditEntry, Priority, Status, Task};
use mahavishnu::{topology, ErrorCode};
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Serves reads until `shutdown`.
pub async fn serve(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let service = ctx
        .nats
        .service_builder()
        .description("Mahavishnu task reads")
        .queue_group(topology::READ_QUEUE_GROUP)
        .start(topology::READ_SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("starting read service: {e}"))?;
    let mut get = service
        .endpoint(topology::SUBJECT_READ_TASK)
        .await
        .map_err(|e| anyhow::anyhow!("adding endpoint: {e}"))?;
    let mut audit = service
        .endpoint(topology::SUBJECT_READ_AUDIT)
        .await
        .map_err(|e| anyhow::anyhow!("adding endpoint: {e}"))?;
    let mut runs = service
        .endpoint(topology::SUBJECT_READ_RUNS)
        .await
        .map_err(|e| anyhow::anyhow!("adding endpoint: {e}"))?;
    let mut cancel = service
        .endpoint(topology::SUBJECT_TASK_CANCEL)
        .await
        .map_err(|e| anyhow::anyhow!("adding endpoint: {e}"))?;
    // Reads share the pool with ingest; they get what ingest does not use, so a burst of reads
    // cannot starve the transactions that persist tasks.
    let s = &ctx.settings;
    let permits = Arc::new(Semaphore::new(
        (s.database.max_connections as usize)
            .saturating_sub(s.worker.max_in_flight_batches)
            .max(1),
    ));
    loop {
        tokio::select! {
            Some(req) = get.next() => {
                let ctx = ctx.clone();
                let permits = permits.clone();
                tokio::spawn(async move {
                    let Ok(_permit) = permits.acquire_owned().await else { return };
                    let reply = get_task(&ctx, &req.message.payload).await;
                    respond(&ctx, "get", req, &reply).await;
                });
            }
            Some(req) = audit.next() => {
                let ctx = ctx.clone();
                let permits = permits.clone();
                tokio::spawn(async move {
                    let Ok(_permit) = permits.acquire_owned().await else { return };
                    let reply = get_audit(&ctx, &req.message.payload).await;
                    respond(&ctx, "audit", req, &reply).await;
                });
            }
            Some(req) = runs.next() => {
                let ctx = ctx.clone();
                let permits = permits.clone();
                tokio::spawn(async move {
                    let Ok(_permit) = permits.acquire_owned().await else { return };
                    let reply = get_runs(&ctx, &req.message.payload).await;
                    respond(&ctx, "runs", req, &reply).await;
                });
            }
            Some(req) = cancel.next() => {
                let ctx = ctx.clone();
                let permits = permits.clone();
                tokio::spawn(async move {
                    let Ok(_permit) = permits.acquire_owned().await else { return };
                    let reply = cancel_task(&ctx, &req.message.payload).await;
                    respond(&ctx, "cancel", req, &reply).await;
                });
            }
            () = shutdown.cancelled() => break,
        }
    }
    let _ = service.stop().await;
    Ok(())
}

async fn respond<T: serde::Serialize>(
    ctx: &Ctx,
    endpoint: &str,
    req: async_nats::service::Request,
    reply: &Reply<T>,
) {
    let outcome = match reply {
        Reply::Ok(_) => "ok",
        Reply::Error(e) => {
            if e.code == ErrorCode::TaskNotFound.as_str() {
                "not_found"
            } else {
                "error"
            }
        }
    };
    ctx.metrics
        .reads_total
        .with_label_values(&[endpoint, outcome])
        .inc();
    let body = serde_json::to_vec(reply).unwrap_or_default();
    if let Err(e) = req.respond(Ok(Bytes::from(body))).await {
        tracing::warn!(error = %e, "could not send read reply");
    }
}

/// Cancels a task (`POST /v1/tasks/{id}/cancel`); see [`mahavishnu::task::control::cancel`].
pub async fn cancel_task(ctx: &Ctx, payload: &[u8]) -> Reply<mahavishnu::read_api::Cancelled> {
    use mahavishnu::task::control::{self, Cancelled};
    let req: mahavishnu::read_api::CancelRequest = match serde_json::from_slice(payload) {
        Ok(r) => r,
        Err(e) => {
            return Reply::Error(ErrorBody::new(
                ErrorCode::MalformedBody,
                format!("bad cancel request: {e}"),
            ))
        }
    };
    let id = req.task_id;
    match control::cancel(&ctx.pool, &ctx.nats, id, &req.actor, req.reason.as_deref()).await {
        Ok(c) => Reply::Ok(mahavishnu::read_api::Cancelled {
            id,
            status: Status::Cancelled.as_str().to_owned(),
            previous_status: match c {
                Cancelled::Now(prev) => prev.as_str().to_owned(),
                Cancelled::Already => Status::Cancelled.as_str().to_owned(),
            },
        }),
        Err(control::ControlError(body)) => Reply::Error(body),
    }
}

/// The task id of a read request, once the task is known to exist (MHV-100 otherwise).
async fn existing_task(ctx: &Ctx, payload: &[u8]) -> Result<Uuid, ErrorBody> {
    let id = parse_id(payload)?;
    let exists = sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM tasks WHERE id = $1)")
        .bind(id)
        .fetch_one(&ctx.pool)
        .await
        .map_err(|e| db_error(&e))?;
    if exists {
        Ok(id)
    } else {
        Err(ErrorBody::new(
            ErrorCode::TaskNotFound,
            format!("no task {id}"),
        ))
    }
}

/// The execution attempts of one task, oldest first.
pub async fn get_runs(ctx: &Ctx, payload: &[u8]) -> Reply<Vec<mahavishnu::task::TaskRun>> {
    let id = match existing_task(ctx, payload).await {
        Ok(id) => id,
        Err(e) => return Reply::Error(e),
    };
    let rows = sqlx::query_as::<_, mahavishnu::task::TaskRun>(
        "SELECT attempt, state, worker_id, action, exit_code, signal, duration_ms, stdout_tail,
                stderr_tail, error_code, error, started_at, finished_at
         FROM task_runs WHERE task_id = $1 ORDER BY attempt LIMIT 1000",
    )
    .bind(id)
    .fetch_all(&ctx.pool)
    .await;
    match rows {
        Ok(r) => Reply::Ok(r),
        Err(e) => Reply::Error(db_error(&e)),
    }
}

fn parse_id(payload: &[u8]) -> Result<Uuid, ErrorBody> {
    std::str::from_utf8(payload)
        .ok()
        .and_then(|s| Uuid::parse_str(s.trim()).ok())
        .ok_or_else(|| ErrorBody::new(ErrorCode::Validation, "the task id must be a UUID"))
}

fn db_error(e: &sqlx::Error) -> ErrorBody {
    tracing::warn!(error = %e, "read failed");
    ErrorBody::new(
        ErrorCode::DatabaseConnection,
        "the task store is unavailable",
    )
}

#[derive(sqlx::FromRow)]
struct TaskRow {
    id: Uuid,
    title: String,
    description: Option<String>,
    repository: String,
    priority: String,
    status: String,
    deadline: Option<chrono::DateTime<chrono::Utc>>,
    metadata: sqlx::types::Json<serde_json::Value>,
    tags: Vec<String>,
    created_by: Uuid,
    assigned_to: Option<Uuid>,
    submitted_by: String,
    created_at: chrono::DateTime<chrono::Utc>,
    updated_at: chrono::DateTime<chrono::Utc>,
}

/// Loads one task.
pub async fn get_task(ctx: &Ctx, payload: &[u8]) -> Reply<Task> {
    let id = match parse_id(payload) {
        Ok(id) => id,
        Err(e) => return Reply::Error(e),
    };
    let row = sqlx::query_as::<_, TaskRow>(
        "SELECT id, title, description, repository, priority, status, deadline, metadata, tags,
                created_by, assigned_to, submitted_by, created_at, updated_at
         FROM tasks WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&ctx.pool)
    .await;
    match row {
        Err(e) => Reply::Error(db_error(&e)),
        Ok(None) => Reply::Error(ErrorBody::new(
            ErrorCode::TaskNotFound,
            format!("no task {id} (a task accepted a moment ago may still be queued)"),
        )),
        Ok(Some(r)) => Reply::Ok(Task {
            id: r.id,
            title: r.title,
            description: r.description,
            repository: r.repository,
            priority: Priority::parse(&r.priority).unwrap_or_default(),
            status: Status::parse(&r.status).unwrap_or(Status::Pending),
            deadline: r.deadline,
            metadata: r.metadata.0,
            tags: r.tags,
            created_by: r.created_by,
            assigned_to: r.assigned_to,
            submitted_by: r.submitted_by,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }),
    }
}

/// Loads a task's audit log (404 when the task does not exist).
pub async fn get_audit(ctx: &Ctx, payload: &[u8]) -> Reply<Vec<AuditEntry>> {
    let id = match existing_task(ctx, payload).await {
        Ok(id) => id,
        Err(e) => return Reply::Error(e),
    };
    let rows = sqlx::query_as::<
        _,
        (
            i64,
            Uuid,
            String,
            String,
            sqlx::types::Json<serde_json::Value>,
            chrono::DateTime<chrono::Utc>,
        ),
    >(
        "SELECT id, task_id, event, actor, details, created_at FROM task_audit_log
         WHERE task_id = $1 ORDER BY id LIMIT 1000",
    )
    .bind(id)
    .fetch_all(&ctx.pool)
    .await;
    match rows {
        Err(e) => Reply::Error(db_error(&e)),
        Ok(rows) => Reply::Ok(
            rows.into_iter()
                .map(
                    |(id, task_id, event, actor, details, created_at)| AuditEntry {
                        id,
                        task_id,
                        event,
                        actor,
                        details: details.0,
                        created_at,
                    },
                )
                .collect(),
        ),
    }
}
