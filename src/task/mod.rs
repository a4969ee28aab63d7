//! The task model shared by the gateway and the workers: what a client may send
//! ([`TaskRequest`]), what survives validation ([`NewTask`]) and what is stored ([`Task`]).
//!
//! Validation lives in [`validate`] and runs twice: at the gateway (fast feedback) and in the
//! workers (producers may publish straight to NATS and bypass the gateway).

pub mod control;
pub mod lifecycle;
pub mod validate;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use validate::{validate, Limits};

/// A task as a client submits it. Every field is optional at this level so that validation can
/// report all problems at once instead of failing on the first missing field.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    /// 1–200 characters after NUL and control characters are removed.
    #[serde(default)]
    pub title: Option<String>,
    /// At most 5,000 characters.
    #[serde(default)]
    pub description: Option<String>,
    /// `^[A-Za-z0-9_-]{1,100}$`.
    #[serde(default)]
    pub repository: Option<String>,
    /// low | medium | high | critical; medium when absent.
    #[serde(default)]
    pub priority: Option<String>,
    /// RFC 3339; must lie in the future when the task is accepted.
    #[serde(default)]
    pub deadline: Option<String>,
    /// Free-form JSON object, bounded in size and depth.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    /// Up to 10 short labels.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
}

/// Task priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Low.
    Low,
    /// The default.
    #[default]
    Medium,
    /// High.
    High,
    /// Critical.
    Critical,
}

impl Priority {
    /// The stored and wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }

    /// Parses the wire spelling (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "low" => Some(Self::Low),
            "medium" => Some(Self::Medium),
            "high" => Some(Self::High),
            "critical" => Some(Self::Critical),
            _ => None,
        }
    }
}

/// Task lifecycle status. `queued` and `running` split the original plan's `in_progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Created but not yet handed to the execution queue.
    Pending,
    /// Accepted and waiting for a worker.
    Queued,
    /// A worker is running it.
    Running,
    /// Finished successfully.
    Completed,
    /// Finished unsuccessfully.
    Failed,
    /// Cancelled by a user.
    Cancelled,
    /// Waiting on something outside the fleet.
    Blocked,
}

impl Status {
    /// The stored and wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Blocked => "blocked",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "queued" => Self::Queued,
            "running" => Self::Running,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            "blocked" => Self::Blocked,
            _ => return None,
        })
    }
}

/// A task that passed validation, ready to be stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewTask {
    /// Sanitised title.
    pub title: String,
    /// Description (NUL characters removed: PostgreSQL text cannot hold them).
    pub description: Option<String>,
    /// Repository name.
    pub repository: String,
    /// Priority.
    pub priority: Priority,
    /// Deadline, in the future at acceptance time.
    pub deadline: Option<DateTime<Utc>>,
    /// Metadata object (`{}` when absent).
    pub metadata: serde_json::Value,
    /// Tags, deduplicated, in the order given.
    pub tags: Vec<String>,
}

/// A stored task, as the read API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Task id.
    pub id: Uuid,
    /// Title.
    pub title: String,
    /// Description.
    pub description: Option<String>,
    /// Repository.
    pub repository: String,
    /// Priority.
    pub priority: Priority,
    /// Status.
    pub status: Status,
    /// Deadline.
    pub deadline: Option<DateTime<Utc>>,
    /// Metadata.
    pub metadata: serde_json::Value,
    /// Tags.
    pub tags: Vec<String>,
    /// The user that owns the task.
    pub created_by: Uuid,
    /// The user it is assigned to, if any.
    pub assigned_to: Option<Uuid>,
    /// The authenticated principal (API key name, producer) that submitted it.
    pub submitted_by: String,
    /// When it was persisted.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// One execution attempt, as the read API returns it (`GET /v1/tasks/{id}/runs`). Output tails
/// are capped (`execution.output_tail_bytes`) and secret-looking environment values redacted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct TaskRun {
    /// 1, 2, … (an attempt taken over from a dead worker counts).
    pub attempt: i32,
    /// running, succeeded, failed, timed_out, gate_failed, cancelled, abandoned, interrupted.
    pub state: String,
    /// The worker that ran it.
    pub worker_id: String,
    /// The action.
    pub action: String,
    /// Exit code, when the command exited by itself.
    pub exit_code: Option<i32>,
    /// Signal, when one ended it (not ours).
    pub signal: Option<i32>,
    /// Wall-clock duration of the command.
    pub duration_ms: Option<i64>,
    /// The end of stdout.
    pub stdout_tail: Option<String>,
    /// The end of stderr.
    pub stderr_tail: Option<String>,
    /// Why it failed (`MHV-2xx`).
    pub error_code: Option<String>,
    /// Why it failed, in words.
    pub error: Option<String>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

/// One audit-log entry, as the read API returns it. Sensitive fields are already redacted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Monotonic id.
    pub id: i64,
    /// Task id.
    pub task_id: Uuid,
    /// Event name (`task_created`, …).
    pub event: String,
    /// Who caused it.
    pub actor: String,
    /// Event details with `description`, `metadata` and secret-like keys redacted.
    pub details: serde_json::Value,
    /// When.
    pub created_at: DateTime<Utc>,
}
