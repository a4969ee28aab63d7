//! Operator and client control of a task's execution, shared by the workers (which answer the
//! gateway's `POST /v1/tasks/{id}/cancel`) and the `mhv` CLI: cancel, retry, and the execution
//! request that puts a task on the execution queue.
//!
//! Each change is a lifecycle transition ([`super::lifecycle`]) with its audit row, committed
//! before anything is published: the database decides, messages only carry the news.

use super::lifecycle::{self, Transition, TransitionError};
use super::Status;
use crate::error::{ErrorBody, ErrorCode};
use crate::topology::{self, ExecRequest};
use serde_json::json;
use uuid::Uuid;

/// Asks the workers to run a task: publishes an [`ExecRequest`] on `mhv.exec.{repository}` with
/// `Nats-Msg-Id: msg_id` and waits for JetStream's ack. Publishing twice is harmless: the
/// executor runs a task only from `queued`, under its lock.
pub async fn request_execution(
    js: &async_nats::jetstream::Context,
    repository: &str,
    task_id: Uuid,
    msg_id: &str,
) -> Result<(), async_nats::Error> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    let body = serde_json::to_vec(&ExecRequest { task_id })?;
    js.publish_with_headers(topology::exec_subject(repository), headers, body.into())
        .await?
        .await?;
    Ok(())
}

/// Tells every worker to stop `task_id` if it runs it (core NATS; the owner also notices the
/// status on its next heartbeat if this is lost).
pub async fn broadcast_cancel(nats: &async_nats::Client, task_id: Uuid) {
    let subject = format!("{}.{task_id}", topology::SUBJECT_CANCEL_PREFIX);
    if let Err(e) = nats.publish(subject, bytes::Bytes::new()).await {
        tracing::warn!(error = %e, task.id = %task_id, "cancel broadcast failed; the owner sees the status at its next heartbeat");
    }
    let _ = nats.flush().await;
}

/// Why a control operation was refused; carries the code the caller shows.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}", .0.code, .0.message)]
pub struct ControlError(pub ErrorBody);

impl ControlError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(ErrorBody::new(code, message))
    }
}

fn db_error(e: &sqlx::Error) -> ControlError {
    tracing::warn!(error = %e, "task control: database error");
    if crate::db::is_transient(e) {
        ControlError::new(
            ErrorCode::DatabaseConnection,
            "the database is unavailable; retry shortly",
        )
    } else {
        ControlError::new(ErrorCode::TaskUpdateFailed, "the task could not be updated")
    }
}

fn refused(e: TransitionError, id: Uuid) -> ControlError {
    match e {
        TransitionError::NotFound => {
            ControlError::new(ErrorCode::TaskNotFound, format!("no task {id}"))
        }
        TransitionError::Conflict { current, .. } => match current {
            Status::Completed => ControlError::new(
                ErrorCode::TaskAlreadyCompleted,
                format!("task {id} is already completed"),
            ),
            Status::Failed | Status::Cancelled => ControlError::new(
                ErrorCode::TaskFinished,
                format!("task {id} is already {}", current.as_str()),
            ),
            other => ControlError::new(
                ErrorCode::TaskUpdateFailed,
                format!("task {id} is {}", other.as_str()),
            ),
        },
        TransitionError::Db(e) => db_error(&e),
    }
}

/// A task made `queued` whose execution request JetStream did not confirm.
fn unconfirmed(id: Uuid, e: &async_nats::Error, then: &str) -> ControlError {
    ControlError::new(
        ErrorCode::BrokerUnavailable,
        format!("task {id} is queued but its execution request was not confirmed ({e}); {then}"),
    )
}

/// What [`cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// The task was in this status and is cancelled now.
    Now(Status),
    /// It was cancelled already (cancelling is idempotent).
    Already,
}

/// Cancels a task: a queued task never starts, a running one is stopped (its process group is
/// killed by the worker that runs it). Idempotent: cancelling a cancelled task succeeds.
pub async fn cancel(
    pool: &sqlx::PgPool,
    nats: &async_nats::Client,
    id: Uuid,
    actor: &str,
    reason: Option<&str>,
) -> Result<Cancelled, ControlError> {
    let mut tx = pool.begin().await.map_err(|e| db_error(&e))?;
    let details = json!({"reason": reason});
    let outcome = match lifecycle::apply(&mut tx, id, Transition::Cancel, actor, details).await {
        Ok(prev) => Cancelled::Now(prev),
        Err(TransitionError::Conflict {
            current: Status::Cancelled,
            ..
        }) => Cancelled::Already,
        Err(e) => return Err(refused(e, id)),
    };
    tx.commit().await.map_err(|e| db_error(&e))?;
    // Also when it was queued: an executor may be starting it right now (it registers for the
    // broadcast before it tries to start the task).
    broadcast_cancel(nats, id).await;
    Ok(outcome)
}

/// Puts a failed task back on the queue with a fresh attempt budget (`mhv tasks retry`, or
/// `mhv dlq replay` of its dead letter `dead_letter`, marked replayed in the same transaction),
/// then requests its execution under a key derived from what asked for it.
pub async fn retry(
    pool: &sqlx::PgPool,
    js: &async_nats::jetstream::Context,
    settings: &crate::config::Settings,
    id: Uuid,
    actor: &str,
    details: serde_json::Value,
    dead_letter: Option<i64>,
) -> Result<RetryOutcome, ControlError> {
    let mut tx = pool.begin().await.map_err(|e| db_error(&e))?;
    // A replay marks its dead letter in the same transaction as the retry: a second replay of the
    // same dead letter finds it marked and retries nothing.
    let mut already_replayed = false;
    if let Some(dl) = dead_letter {
        let marked: Option<i64> = sqlx::query_scalar(
            "UPDATE dead_letters SET replayed_at = now() WHERE id = $1 AND replayed_at IS NULL RETURNING id",
        )
        .bind(dl)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| db_error(&e))?;
        already_replayed = marked.is_none();
    }
    let row: Option<(String, sqlx::types::Json<serde_json::Value>)> =
        sqlx::query_as("SELECT repository, metadata FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| db_error(&e))?;
    let Some((repository, metadata)) = row else {
        return Err(ControlError::new(
            ErrorCode::TaskNotFound,
            format!("no task {id}"),
        ));
    };
    let plan = crate::registry::resolve(
        &settings.repositories,
        &repository,
        crate::registry::requested_action(&metadata.0),
    )
    .map_err(|e| ControlError::new(e.code, e.message))?;
    if plan.is_none() {
        return Err(ControlError::new(
            ErrorCode::RepositoryNotConfigured,
            format!("task {id} runs nothing under the current registry; there is nothing to retry"),
        ));
    }
    let applied = if already_replayed {
        // Replayed before: only make sure a still-queued task has its request.
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| db_error(&e))?;
        match status.as_deref().and_then(Status::parse) {
            Some(Status::Queued) => Ok(Status::Queued),
            Some(current) => {
                return Ok(RetryOutcome::AlreadyReplayed(current));
            }
            None => Err(TransitionError::NotFound),
        }
        .map(|_| RetryOutcome::AlreadyQueued)
    } else {
        lifecycle::apply(&mut tx, id, Transition::Retry, actor, details)
            .await
            .map(|_| RetryOutcome::Queued)
    };
    let outcome = match applied {
        Ok(o) => o,
        Err(TransitionError::Conflict {
            current: Status::Queued,
            ..
        }) => RetryOutcome::AlreadyQueued,
        Err(e) => return Err(refused(e, id)),
    };
    tx.commit().await.map_err(|e| db_error(&e))?;
    // The request's id is derived from the number of attempts so far: two retries of the same
    // failure share it (and JetStream drops the second inside its window; outside it, the
    // executor finds the task already running or done).
    let msg_id = match dead_letter {
        Some(dl) => format!("exec:{id}:dlq:{dl}"),
        None => {
            let attempts: i64 =
                sqlx::query_scalar("SELECT count(*) FROM task_runs WHERE task_id = $1")
                    .bind(id)
                    .fetch_one(pool)
                    .await
                    .map_err(|e| db_error(&e))?;
            format!("exec:{id}:retry:{attempts}")
        }
    };
    request_execution(js, &repository, id, &msg_id)
        .await
        .map_err(|e| unconfirmed(id, &e, "run the same command again"))?;
    Ok(outcome)
}

/// Blocks a pending or queued task: it will not start until unblocked (its execution request,
/// if any, is acked without running it). A running task cannot be blocked (cancel it instead).
pub async fn block(
    pool: &sqlx::PgPool,
    id: Uuid,
    actor: &str,
    reason: Option<&str>,
) -> Result<Status, ControlError> {
    let mut tx = pool.begin().await.map_err(|e| db_error(&e))?;
    let prev = lifecycle::apply(
        &mut tx,
        id,
        Transition::Block,
        actor,
        json!({"reason": reason}),
    )
    .await
    .map_err(|e| refused(e, id))?;
    tx.commit().await.map_err(|e| db_error(&e))?;
    Ok(prev)
}

/// Unblocks a task (back to `queued`) and, if it has something to run, requests its execution.
pub async fn unblock(
    pool: &sqlx::PgPool,
    js: &async_nats::jetstream::Context,
    settings: &crate::config::Settings,
    id: Uuid,
    actor: &str,
) -> Result<(), ControlError> {
    let mut tx = pool.begin().await.map_err(|e| db_error(&e))?;
    lifecycle::apply(&mut tx, id, Transition::Unblock, actor, json!({}))
        .await
        .map_err(|e| refused(e, id))?;
    let (repository, metadata, unblocks): (String, sqlx::types::Json<serde_json::Value>, i64) =
        sqlx::query_as(
            "SELECT repository, metadata,
                    (SELECT count(*) FROM task_audit_log WHERE task_id = $1 AND event = 'task_unblocked')
             FROM tasks WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| db_error(&e))?;
    tx.commit().await.map_err(|e| db_error(&e))?;
    let runs = crate::registry::resolve(
        &settings.repositories,
        &repository,
        crate::registry::requested_action(&metadata.0),
    );
    if matches!(runs, Ok(Some(_))) {
        request_execution(
            js,
            &repository,
            id,
            &format!("exec:{id}:unblock:{unblocks}"),
        )
        .await
        .map_err(|e| unconfirmed(id, &e, &format!("run `mhv tasks retry {id}`")))?;
    }
    Ok(())
}

/// Assigns a task to a user by username, or unassigns it (`None`); audited as `task_assigned`.
pub async fn assign(
    pool: &sqlx::PgPool,
    id: Uuid,
    username: Option<&str>,
    actor: &str,
) -> Result<(), ControlError> {
    let mut tx = pool.begin().await.map_err(|e| db_error(&e))?;
    let user = match username {
        None => None,
        Some(name) => {
            let u: Option<Uuid> =
                sqlx::query_scalar("SELECT id FROM users WHERE username = $1 AND is_active")
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| db_error(&e))?;
            Some(u.ok_or_else(|| {
                ControlError::new(ErrorCode::Validation, format!("no active user {name:?}"))
            })?)
        }
    };
    lifecycle::assign(&mut tx, id, user, actor)
        .await
        .map_err(|e| refused(e, id))?;
    tx.commit().await.map_err(|e| db_error(&e))?;
    Ok(())
}

/// What [`retry`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The failed task is queued again.
    Queued,
    /// It was queued already; its execution request was published again (harmless).
    AlreadyQueued,
    /// The dead letter was replayed before; the task is in this status now, nothing was done.
    AlreadyReplayed(Status),
}
