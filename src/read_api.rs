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
/// Reply to `mhv.api.tasks.audit`.
pub type AuditReply = Reply<Vec<AuditEntry>>;
