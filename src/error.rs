//! The error catalog: stable `MHV-xxx` codes with a title, an HTTP status and recovery steps.
//!
//! # Error policy
//! - Crate and HTTP boundaries use typed errors (`thiserror`); start-up and glue code use `anyhow`
//!   with `.context(..)`.
//! - Every error a user can see carries an [`ErrorCode`]. The code, its title and its recovery text
//!   are part of our public contract: codes are never renumbered or reused.
//! - Internal causes (database text, broker errors) are logged where they are handled and are
//!   never sent to a client.
//! - Whether to retry is decided by kind ([`ErrorCode::is_transient`]), never by message text.
//!
//! Ranges: `0xx` system, `1xx` task, `2xx` repository, `3xx` external integration.

use serde::Serialize;

/// A stable error code. `as_str()` gives the `MHV-xxx` form used in responses, logs and docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// MHV-001: the configuration is invalid.
    Configuration,
    /// MHV-002: PostgreSQL cannot be reached or refused the operation.
    DatabaseConnection,
    /// MHV-003: the request or message failed validation.
    Validation,
    /// MHV-004: missing or unknown credentials.
    Authentication,
    /// MHV-005: the credentials do not allow this operation.
    Authorization,
    /// MHV-006: the caller exceeded a rate limit.
    RateLimited,
    /// MHV-007: the message broker (NATS JetStream) did not accept the message.
    BrokerUnavailable,
    /// MHV-008: no worker answered a read request in time.
    WorkerUnavailable,
    /// MHV-009: the request body is larger than the endpoint accepts.
    PayloadTooLarge,
    /// MHV-010: the body's media type is not supported.
    UnsupportedMediaType,
    /// MHV-011: the request could not be decoded (malformed JSON or MessagePack).
    MalformedBody,
    /// MHV-012: an unexpected internal error.
    Internal,
    /// MHV-013: the gateway is at its in-flight request limit.
    Overloaded,
    /// MHV-014: a stored (claim-checked) webhook body is gone before a worker processed it.
    StoredBodyMissing,
    /// MHV-015: JetStream stopped delivering a message after `nats.consumer.max_deliver` tries.
    DeliveryLimitReached,
    /// MHV-100: no task with that id.
    TaskNotFound,
    /// MHV-101: the task could not be created.
    TaskCreationFailed,
    /// MHV-102: the task could not be updated.
    TaskUpdateFailed,
    /// MHV-103: the task could not be deleted.
    TaskDeletionFailed,
    /// MHV-104: the task is already completed.
    TaskAlreadyCompleted,
    /// MHV-105: the task is blocked.
    TaskBlocked,
    /// MHV-106: an idempotency key was reused with a different request body.
    IdempotencyConflict,
    /// MHV-107: the task has finished (failed or cancelled); the operation no longer applies.
    TaskFinished,
    /// MHV-200: unknown repository.
    RepositoryNotFound,
    /// MHV-201: the repository is not configured for execution.
    RepositoryNotConfigured,
    /// MHV-202: a worktree could not be created.
    WorktreeCreationFailed,
    /// MHV-203: the repository has no action with that name.
    ActionNotFound,
    /// MHV-204: the action failed and will not be retried (a non-retryable exit, or attempts ran out).
    ActionFailed,
    /// MHV-205: the action ran past its timeout on its last attempt.
    ActionTimedOut,
    /// MHV-206: a quality gate failed after the action succeeded.
    QualityGateFailed,
    /// MHV-300: webhook signature invalid.
    WebhookSignatureInvalid,
    /// MHV-301: webhook replay detected.
    WebhookReplay,
    /// MHV-302: GitHub API error.
    GitHubApi,
    /// MHV-303: GitLab API error.
    GitLabApi,
    /// MHV-304: the webhook's signed timestamp is outside the tolerance.
    WebhookTimestampOutOfTolerance,
    /// MHV-305: no webhook source with that name is configured.
    WebhookSourceNotFound,
    /// MHV-306: a required webhook header is missing or malformed.
    WebhookHeaderInvalid,
}

/// Everything the catalog knows about one code.
#[derive(Debug, Clone, Copy)]
pub struct CodeInfo {
    /// `MHV-xxx`.
    pub code: &'static str,
    /// Short title.
    pub title: &'static str,
    /// HTTP status used when this code reaches an HTTP client.
    pub http_status: u16,
    /// What the caller or operator should do.
    pub recovery: &'static str,
    /// True when retrying the same operation later can succeed.
    pub transient: bool,
}

impl ErrorCode {
    /// Every code, in catalog order (used by docs and tests).
    pub const ALL: &'static [ErrorCode] = &[
        Self::Configuration,
        Self::DatabaseConnection,
        Self::Validation,
        Self::Authentication,
        Self::Authorization,
        Self::RateLimited,
        Self::BrokerUnavailable,
        Self::WorkerUnavailable,
        Self::PayloadTooLarge,
        Self::UnsupportedMediaType,
        Self::MalformedBody,
        Self::Internal,
        Self::Overloaded,
        Self::StoredBodyMissing,
        Self::DeliveryLimitReached,
        Self::TaskNotFound,
        Self::TaskCreationFailed,
        Self::TaskUpdateFailed,
        Self::TaskDeletionFailed,
        Self::TaskAlreadyCompleted,
        Self::TaskBlocked,
        Self::IdempotencyConflict,
        Self::TaskFinished,
        Self::RepositoryNotFound,
        Self::RepositoryNotConfigured,
        Self::WorktreeCreationFailed,
        Self::ActionNotFound,
        Self::ActionFailed,
        Self::ActionTimedOut,
        Self::QualityGateFailed,
        Self::WebhookSignatureInvalid,
        Self::WebhookReplay,
        Self::GitHubApi,
        Self::GitLabApi,
        Self::WebhookTimestampOutOfTolerance,
        Self::WebhookSourceNotFound,
        Self::WebhookHeaderInvalid,
    ];

    /// The catalog entry.
    pub const fn info(self) -> CodeInfo {
        use ErrorCode::*;
        let (code, title, http_status, transient, recovery) = match self {
            Configuration => ("MHV-001", "configuration error", 500, false,
                "Fix the setting named in the message (config file or MHV_* variable) and restart; `mhv config check` validates without starting."),
            DatabaseConnection => ("MHV-002", "database connection error", 503, true,
                "Retry with backoff. Operators: check PostgreSQL is up and `database.url` is right; see runbooks/database.md."),
            Validation => ("MHV-003", "validation error", 422, false,
                "Correct the field named in `details` and send the request again; see docs/api.md for the rules."),
            Authentication => ("MHV-004", "authentication error", 401, false,
                "Send `Authorization: Bearer <api key>` with a key the operator issued."),
            Authorization => ("MHV-005", "authorization error", 403, false,
                "Use a key that is allowed to perform this operation, or ask an operator to grant it."),
            RateLimited => ("MHV-006", "rate limit exceeded", 429, true,
                "Wait for the number of seconds in `Retry-After`, then retry."),
            BrokerUnavailable => ("MHV-007", "message broker unavailable", 503, true,
                "The task was not confirmed (it may or may not be queued). Retry with the same Idempotency-Key after a short backoff: it cannot create a second task. Operators: see runbooks/nats.md."),
            WorkerUnavailable => ("MHV-008", "no worker answered", 503, true,
                "Retry after a short backoff; operators: check that workers are running (`mhv_worker_up`)."),
            PayloadTooLarge => ("MHV-009", "payload too large", 413, false,
                "Send a smaller body; the limit is in the message."),
            UnsupportedMediaType => ("MHV-010", "unsupported media type", 415, false,
                "Send `Content-Type: application/json` (or `application/msgpack`)."),
            MalformedBody => ("MHV-011", "malformed body", 400, false,
                "Send a well-formed JSON (or MessagePack) object; the message says where decoding failed."),
            Internal => ("MHV-012", "internal error", 500, true,
                "Retry later; if it persists, report the time, endpoint and code to an operator (the gateway log has the cause)."),
            Overloaded => ("MHV-013", "gateway overloaded", 503, true,
                "Retry after the number of seconds in `Retry-After`; operators: scale the gateway or raise gateway.max_in_flight_requests."),
            StoredBodyMissing => ("MHV-014", "stored webhook body missing", 500, false,
                "The claim-checked body expired from the object store before a worker processed it (workers were down longer than webhooks.claim_check_max_age_hours). Ask the sender to redeliver; operators: see runbooks/webhooks.md."),
            DeliveryLimitReached => ("MHV-015", "delivery limit reached", 500, false,
                "JetStream stopped delivering the message after nats.consumer.max_deliver tries, each of which failed for a passing reason (often an outage). It was moved to the dead letters: fix the cause, then `mhv dlq replay ID`. See runbooks/nats.md."),
            TaskNotFound => ("MHV-100", "task not found", 404, false,
                "Check the id. A task accepted a moment ago may still be queued: retry after a short delay."),
            TaskCreationFailed => ("MHV-101", "task creation failed", 500, false,
                "The database refused the task for a reason validation did not foresee; it is kept as a dead letter. Operators: inspect it (runbooks/database.md), fix the cause, then resubmit."),
            TaskUpdateFailed => ("MHV-102", "task update failed", 500, true,
                "Retry the update; if it persists, report the task id."),
            TaskDeletionFailed => ("MHV-103", "task deletion failed", 500, true,
                "Retry the deletion; if it persists, report the task id."),
            TaskAlreadyCompleted => ("MHV-104", "task already completed", 409, false,
                "Create a new task instead of changing a completed one."),
            TaskBlocked => ("MHV-105", "task blocked", 409, false,
                "Unblock the task first, then retry."),
            IdempotencyConflict => ("MHV-106", "idempotency key reused with a different request", 409, false,
                "Use a new Idempotency-Key for a different request; the first request with this key stands."),
            TaskFinished => ("MHV-107", "task already finished", 409, false,
                "The task failed or was cancelled. A failed task can be queued again (`mhv tasks retry ID`, or `mhv dlq replay` of its dead letter); a cancelled one cannot: create a new task."),
            RepositoryNotFound => ("MHV-200", "repository not found", 422, false,
                "Name a repository the fleet has registered (`[repositories.<name>]`; `mhv config check` prints them) or ask an operator to register it."),
            RepositoryNotConfigured => ("MHV-201", "repository not configured", 422, false,
                "The repository is registered but has no path or no actions, so it cannot run anything: drop `metadata.action`, or ask an operator to configure it for execution."),
            WorktreeCreationFailed => ("MHV-202", "worktree creation failed", 500, true,
                "Retried automatically; operators: check disk space, the repository path and its default branch (runbooks/execution.md)."),
            ActionNotFound => ("MHV-203", "action not found", 422, false,
                "Name one of the repository's actions in `metadata.action` (the message lists them), or leave it out to run the default."),
            ActionFailed => ("MHV-204", "action failed", 500, false,
                "The task is failed and dead-lettered with the exit code and output tail (`mhv dlq show ID`). Fix the cause, then `mhv dlq replay ID` or `mhv tasks retry TASK`."),
            ActionTimedOut => ("MHV-205", "action timed out", 500, false,
                "The last attempt ran past the action's timeout_secs and was killed with its process group, and no attempts were left. Make it faster or raise the timeout, then `mhv dlq replay ID`."),
            QualityGateFailed => ("MHV-206", "quality gate failed", 500, false,
                "The action succeeded but a gate named in the reason failed; its output tail is in the dead letter. Fix the cause, then `mhv dlq replay ID`."),
            WebhookSignatureInvalid => ("MHV-300", "webhook signature invalid", 401, false,
                "Check the webhook secret configured at the sender matches an active secret of the source."),
            WebhookReplay => ("MHV-301", "webhook replay detected", 409, false,
                "This delivery id was already used with a different body; the first body stands and the attempt is audited. Senders: never reuse a delivery id for new content. Operators: see runbooks/webhooks.md (tampering)."),
            GitHubApi => ("MHV-302", "GitHub API error", 502, true,
                "Retried automatically; check GitHub status and the token's scopes."),
            GitLabApi => ("MHV-303", "GitLab API error", 502, true,
                "Retried automatically; check GitLab status and the token's scopes."),
            WebhookTimestampOutOfTolerance => ("MHV-304", "webhook timestamp outside tolerance", 401, false,
                "The signed timestamp is too far from the receiver's clock. Senders: sign with the current time and check the clock (NTP); a captured delivery cannot be replayed later. Operators: webhooks.sources.<name>.tolerance_secs sets the window."),
            WebhookSourceNotFound => ("MHV-305", "webhook source not found", 404, false,
                "Check the URL: POST /v1/webhooks/<source> with a source configured under webhooks.sources (`mhv webhooks list`)."),
            WebhookHeaderInvalid => ("MHV-306", "webhook header missing or malformed", 400, false,
                "Send the headers the source's scheme requires (delivery id, event, timestamp); the message names the header. See docs/webhooks.md."),
        };
        CodeInfo {
            code,
            title,
            http_status,
            recovery,
            transient,
        }
    }

    /// The `MHV-xxx` string.
    pub const fn as_str(self) -> &'static str {
        self.info().code
    }

    /// True when retrying later can succeed.
    pub const fn is_transient(self) -> bool {
        self.info().transient
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON body of every error response and every error reply between our processes.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ErrorBody {
    /// `MHV-xxx`.
    pub code: String,
    /// Short title of the code.
    pub title: String,
    /// What went wrong, for a human.
    pub message: String,
    /// What to do about it.
    pub recovery: String,
    /// Field-level details (e.g. validation failures), when there are any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<FieldError>,
}

/// One field that failed validation.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct FieldError {
    /// The field's name (dotted for nested fields).
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ErrorBody {
    /// Builds the body for a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let info = code.info();
        Self {
            code: info.code.to_owned(),
            title: info.title.to_owned(),
            message: message.into(),
            recovery: info.recovery.to_owned(),
            details: Vec::new(),
        }
    }

    /// Adds field details.
    pub fn with_details(mut self, details: Vec<FieldError>) -> Self {
        self.details = details;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// docs/errors.md's catalog table is generated from [`ErrorCode::info`]: this test fails when
    /// they differ, and rewrites the table when `BLESS_ERRORS_DOC=1` is set.
    #[test]
    fn docs_errors_md_catalog_matches_the_code() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/errors.md");
        let doc = std::fs::read_to_string(&path).unwrap();
        let header =
            "| Code | Title | HTTP status | Transient | Recovery |\n|---|---|---|---|---|\n";
        let start = doc.find(header).expect("catalog table header") + header.len();
        let end = start
            + doc[start..]
                .find("\n\n")
                .expect("blank line after the table")
            + 1;
        let table: String = ErrorCode::ALL
            .iter()
            .map(|c| {
                let i = c.info();
                format!(
                    "| `{}` | {} | {} | {} | {} |\n",
                    i.code,
                    i.title,
                    i.http_status,
                    if i.transient { "yes" } else { "no" },
                    i.recovery
                )
            })
            .collect();
        if std::env::var_os("BLESS_ERRORS_DOC").is_some() {
            std::fs::write(&path, format!("{}{table}{}", &doc[..start], &doc[end..])).unwrap();
        } else {
            assert_eq!(
                doc[start..end],
                table,
                "docs/errors.md is stale: run BLESS_ERRORS_DOC=1 cargo test -p mahavishnu --lib docs_errors"
            );
        }
    }

    #[test]
    fn codes_are_unique_well_formed_and_in_their_range() {
        let mut seen = HashSet::new();
        for code in ErrorCode::ALL {
            let info = code.info();
            assert!(seen.insert(info.code), "duplicate {}", info.code);
            assert!(
                info.code.starts_with("MHV-") && info.code.len() == 7,
                "{}",
                info.code
            );
            assert!(!info.recovery.is_empty() && !info.title.is_empty());
            assert!((400..600).contains(&info.http_status));
        }
        assert_eq!(ErrorCode::RepositoryNotFound.as_str(), "MHV-200");
        assert_eq!(ErrorCode::WebhookSignatureInvalid.as_str(), "MHV-300");
        assert_eq!(ErrorCode::WebhookHeaderInvalid.as_str(), "MHV-306");
        assert_eq!(ErrorCode::ALL.len(), 37);
        assert!(ErrorCode::BrokerUnavailable.is_transient());
        assert!(!ErrorCode::Validation.is_transient());
    }
}
