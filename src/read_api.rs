//! The read contract between the gateway and the workers: NATS request-reply through the
//! `mhv-tasks` service (async-nats service API), so that the gateway never holds database
//! credentials. Requests carry the task id as UTF-8 text; replies are JSON [`Reply`] values.

use crate::error::ErrorBody;
use crate::task::{AuditEntry, Task};
use serde::{Deserialize, Serialize};

/// A worker's answer to a read request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    /// The value.
    Ok(T),
    /// An error with its MHV code (e.g. MHV-100 not found, MHV-002 database down).
    Error(ErrorBody),
}

/// Reply to `mhv.api.tasks.get`.
pub type TaskReply = Reply<Task>;
/// Reply to `mhv.api.tasks.runs`.
pub type RunsReply = Reply<Vec<crate::task::TaskRun>>;
/// Reply to `mhv.api.tasks.audit`.
pub type AuditReply = Reply<Vec<AuditEntry>>;

/// Request to `mhv.api.tasks.cancel` (JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CancelRequest {
    /// The task.
    pub task_id: uuid::Uuid,
    /// Who asks (`api:<key name>`), for the audit row.
    pub actor: String,
    /// Why, for the audit row (at most 500 characters).
    #[serde(default)]
    pub reason: Option<String>,
}

/// The answer to a cancel request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cancelled {
    /// The task.
    pub id: uuid::Uuid,
    /// Always `cancelled`.
    pub status: String,
    /// Its status before this request (`cancelled` when it was cancelled already).
    pub previous_status: String,
}

/// Reply to `mhv.api.tasks.cancel`.
pub type CancelReply = Reply<Cancelled>;
