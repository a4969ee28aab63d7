//! The task lifecycle as a state machine, enforced in PostgreSQL.
//!
//! ```text
//! pending ─► queued ─► running ─► completed
//!    │         ▲ │        │ └───► failed ─► queued (retry)
//!    │         │ │        └─────► queued (requeue: passing failure, takeover)
//!    ├─► blocked ◄┘
//!    │      └──► queued (unblock)
//!    └─► cancelled ◄── queued | running | blocked
//! ```
//!
//! Every change is a conditional update (`… WHERE status = ANY(allowed sources)`) with its audit
//! row in the same transaction, so two workers racing for the same task cannot both win, and no
//! change goes unaudited. A trigger (migration `20261122000002`) refuses any other status change,
//! whoever writes it. [`ALLOWED`] is the one list both follow; a test checks they agree.

use super::Status;
use serde_json::{json, Value};
use uuid::Uuid;

/// Every allowed status change, by the status it starts from.
pub const ALLOWED: &[(Status, &[Status])] = &[
    (
        Status::Pending,
        &[Status::Queued, Status::Blocked, Status::Cancelled],
    ),
    (
        Status::Queued,
        &[Status::Running, Status::Blocked, Status::Cancelled],
    ),
    (
        Status::Running,
        &[
            Status::Completed,
            Status::Failed,
            Status::Queued,
            Status::Cancelled,
        ],
    ),
    (Status::Failed, &[Status::Queued]),
    (Status::Blocked, &[Status::Queued, Status::Cancelled]),
];

/// True when `from → to` is an allowed change.
pub fn allowed(from: Status, to: Status) -> bool {
    ALLOWED
        .iter()
        .any(|(f, tos)| *f == from && tos.contains(&to))
}

/// A named change, with the audit event it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// pending → queued.
    Enqueue,
    /// queued → running: a worker took the task.
    Start,
    /// running → completed.
    Complete,
    /// running → failed (permanently, or attempts exhausted).
    Fail,
    /// running → queued: a passing failure, or a takeover after a dead worker.
    Requeue,
    /// failed → queued: an operator retries it (`mhv tasks retry`).
    Retry,
    /// pending | queued → blocked.
    Block,
    /// blocked → queued.
    Unblock,
    /// pending | queued | running | blocked → cancelled.
    Cancel,
}

impl Transition {
    /// The status it leads to.
    pub const fn to(self) -> Status {
        match self {
            Self::Enqueue | Self::Requeue | Self::Retry | Self::Unblock => Status::Queued,
            Self::Start => Status::Running,
            Self::Complete => Status::Completed,
            Self::Fail => Status::Failed,
            Self::Block => Status::Blocked,
            Self::Cancel => Status::Cancelled,
        }
    }

    /// The statuses it may start from (every allowed change into [`Transition::to`] that this
    /// transition names).
    pub fn from(self) -> Vec<Status> {
        let named: &[Status] = match self {
            Self::Enqueue => &[Status::Pending],
            Self::Start => &[Status::Queued],
            Self::Complete | Self::Fail | Self::Requeue => &[Status::Running],
            Self::Retry => &[Status::Failed],
            Self::Block => &[Status::Pending, Status::Queued],
            Self::Unblock => &[Status::Blocked],
            Self::Cancel => &[
                Status::Pending,
                Status::Queued,
                Status::Running,
                Status::Blocked,
            ],
        };
        named
            .iter()
            .copied()
            .filter(|f| allowed(*f, self.to()))
            .collect()
    }

    /// The audit event it writes.
    pub const fn event(self) -> &'static str {
        match self {
            Self::Enqueue => "task_queued",
            Self::Start => "task_started",
            Self::Complete => "task_completed",
            Self::Fail => "task_failed",
            Self::Requeue => "task_requeued",
            Self::Retry => "task_retried",
            Self::Block => "task_blocked",
            Self::Unblock => "task_unblocked",
            Self::Cancel => "task_cancelled",
        }
    }
}

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    /// No task with that id.
    #[error("no task with that id")]
    NotFound,
    /// The task is in a status this change does not start from (someone else changed it first).
    #[error("the task is {}; {wanted:?} does not apply", current.as_str())]
    Conflict {
        /// Its status now.
        current: Status,
        /// What was asked.
        wanted: Transition,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Applies `t` to `task` inside the caller's transaction and writes its audit row; returns the
/// status the task had. `details` is merged into the audit row's details (`from` and `to` are
/// always there).
pub async fn apply(
    conn: &mut sqlx::PgConnection,
    task: Uuid,
    t: Transition,
    actor: &str,
    details: Value,
) -> Result<Status, TransitionError> {
    let from: Vec<&str> = t.from().iter().map(|s| s.as_str()).collect();
    let prev: Option<String> = sqlx::query_scalar(
        "WITH prev AS (SELECT id, status FROM tasks WHERE id = $1 FOR UPDATE)
         UPDATE tasks SET status = $2, updated_at = clock_timestamp()
         FROM prev WHERE tasks.id = prev.id AND prev.status = ANY($3)
         RETURNING prev.status",
    )
    .bind(task)
    .bind(t.to().as_str())
    .bind(&from)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(prev) = prev.as_deref().and_then(Status::parse) else {
        return Err(refused(conn, task, t).await);
    };
    let mut d = json!({"from": prev.as_str(), "to": t.to().as_str()});
    if let (Some(map), Value::Object(extra)) = (d.as_object_mut(), details) {
        map.extend(extra);
    }
    sqlx::query(
        // clock_timestamp(), not now(): an executor writes its verdict in a transaction that
        // began when the attempt did.
        "INSERT INTO task_audit_log (task_id, event, actor, details, created_at)
         VALUES ($1, $2, $3, $4, clock_timestamp())",
    )
    .bind(task)
    .bind(t.event())
    .bind(actor)
    .bind(sqlx::types::Json(d))
    .execute(&mut *conn)
    .await?;
    Ok(prev)
}

/// Why a conditional update matched no row: the task is missing, or in another status.
async fn refused(conn: &mut sqlx::PgConnection, task: Uuid, wanted: Transition) -> TransitionError {
    let current: Result<Option<String>, sqlx::Error> =
        sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
            .bind(task)
            .fetch_optional(&mut *conn)
            .await;
    match current {
        Err(e) => TransitionError::Db(e),
        Ok(s) => match s.as_deref().and_then(Status::parse) {
            None => TransitionError::NotFound,
            Some(current) => TransitionError::Conflict { current, wanted },
        },
    }
}

/// Assigns `task` to `user` (or unassigns it), audited as `task_assigned`. Refused once the task
/// is completed or cancelled.
pub async fn assign(
    conn: &mut sqlx::PgConnection,
    task: Uuid,
    user: Option<Uuid>,
    actor: &str,
) -> Result<(), TransitionError> {
    let done = sqlx::query_scalar::<_, String>(
        "UPDATE tasks SET assigned_to = $2, updated_at = now()
         WHERE id = $1 AND status NOT IN ('completed', 'cancelled')
         RETURNING status",
    )
    .bind(task)
    .bind(user)
    .fetch_optional(&mut *conn)
    .await?;
    if done.is_none() {
        return Err(refused(conn, task, Transition::Start).await);
    }
    sqlx::query(
        "INSERT INTO task_audit_log (task_id, event, actor, details) VALUES ($1, 'task_assigned', $2, $3)",
    )
    .bind(task)
    .bind(actor)
    .bind(sqlx::types::Json(json!({"assigned_to": user})))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transition_starts_from_allowed_statuses_only() {
        for t in [
            Transition::Enqueue,
            Transition::Start,
            Transition::Complete,
            Transition::Fail,
            Transition::Requeue,
            Transition::Retry,
            Transition::Block,
            Transition::Unblock,
            Transition::Cancel,
        ] {
            assert!(!t.from().is_empty(), "{t:?} can never apply");
            for f in t.from() {
                assert!(allowed(f, t.to()));
            }
        }
        assert!(!allowed(Status::Completed, Status::Queued));
        assert!(!allowed(Status::Cancelled, Status::Running));
    }
}
