//! `mhv tasks`: cancel a task, retry a failed one, show its attempts.

use crate::config::Settings;
use crate::task::control::{self, Cancelled, RetryOutcome};
use crate::{db, topology};
use anyhow::Context as _;
use clap::Subcommand;
use uuid::Uuid;

/// `mhv tasks …`.
#[derive(Subcommand, Debug)]
pub enum TasksCommand {
    /// Cancel a task: a queued task never starts; a running one has its process group stopped
    /// within 2 s by the worker running it. Audited as `task_cancelled`.
    Cancel {
        /// Task id.
        id: Uuid,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Queue a failed task again with a fresh attempt budget (audited as `task_retried`).
    Retry {
        /// Task id.
        id: Uuid,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Block a pending or queued task: it does not start until unblocked (audited).
    Block {
        /// Task id.
        id: Uuid,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Unblock a task: back to queued, and run if it has an action (audited).
    Unblock {
        /// Task id.
        id: Uuid,
    },
    /// Assign a task to a user (by username), or unassign it with --none (audited).
    Assign {
        /// Task id.
        id: Uuid,
        /// Username.
        #[arg(long, conflicts_with = "none", required_unless_present = "none")]
        user: Option<String>,
        /// Remove the assignment.
        #[arg(long)]
        none: bool,
    },
    /// Show a task's status, its attempts and its saga log.
    Runs {
        /// Task id.
        id: Uuid,
    },
}

/// Who runs the CLI, for audit rows.
pub fn cli_actor() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    )
}

/// Runs a `mhv tasks` command.
pub async fn run(s: Settings, cmd: TasksCommand) -> anyhow::Result<()> {
    let pool = db::pool(&s.database)?;
    match cmd {
        TasksCommand::Cancel { id, reason } => {
            let nats = topology::connect(&s.nats.url, "mhv-cli").await?;
            match control::cancel(&pool, &nats, id, &cli_actor(), reason.as_deref()).await {
                Ok(Cancelled::Now(prev)) => {
                    println!("task {id} cancelled (it was {})", prev.as_str());
                }
                Ok(Cancelled::Already) => println!("task {id} was already cancelled"),
                Err(control::ControlError(e)) => anyhow::bail!("{}: {}", e.code, e.message),
            }
        }
        TasksCommand::Retry { id, reason } => {
            let nats = topology::connect(&s.nats.url, "mhv-cli").await?;
            let js = async_nats::jetstream::new(nats);
            topology::ensure_exec_stream_exists(&js, &s).await?;
            let details = serde_json::json!({"reason": reason});
            match control::retry(&pool, &js, &s, id, &cli_actor(), details, None).await {
                Ok(RetryOutcome::Queued) => println!("task {id} queued again"),
                Ok(RetryOutcome::AlreadyQueued) => {
                    println!("task {id} was already queued; its execution request was sent again");
                }
                Ok(RetryOutcome::AlreadyReplayed(st)) => println!("task {id} is {}", st.as_str()),
                Err(control::ControlError(e)) => anyhow::bail!("{}: {}", e.code, e.message),
            }
        }
        TasksCommand::Block { id, reason } => {
            match control::block(&pool, id, &cli_actor(), reason.as_deref()).await {
                Ok(prev) => println!("task {id} blocked (it was {})", prev.as_str()),
                Err(control::ControlError(e)) => anyhow::bail!("{}: {}", e.code, e.message),
            }
        }
        TasksCommand::Unblock { id } => {
            let nats = topology::connect(&s.nats.url, "mhv-cli").await?;
            let js = async_nats::jetstream::new(nats);
            topology::ensure_exec_stream_exists(&js, &s).await?;
            match control::unblock(&pool, &js, &s, id, &cli_actor()).await {
                Ok(()) => println!("task {id} unblocked (queued)"),
                Err(control::ControlError(e)) => anyhow::bail!("{}: {}", e.code, e.message),
            }
        }
        TasksCommand::Assign { id, user, none: _ } => {
            match control::assign(&pool, id, user.as_deref(), &cli_actor()).await {
                Ok(()) => println!(
                    "task {id} {}",
                    user.map_or("unassigned".into(), |u| format!("assigned to {u}"))
                ),
                Err(control::ControlError(e)) => anyhow::bail!("{}: {}", e.code, e.message),
            }
        }
        TasksCommand::Runs { id } => runs(&pool, id).await?,
    }
    Ok(())
}

async fn runs(pool: &sqlx::PgPool, id: Uuid) -> anyhow::Result<()> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .context("MHV-002: reading tasks")?;
    let Some(status) = status else {
        anyhow::bail!("MHV-100: no task {id}");
    };
    println!("task {id}: {status}");
    type Run = (
        i32,
        String,
        String,
        Option<i32>,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let rows: Vec<Run> = sqlx::query_as(
        "SELECT attempt, state, worker_id, exit_code, duration_ms, error_code, error, stderr_tail
         FROM task_runs WHERE task_id = $1 ORDER BY attempt",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    for (attempt, state, worker, exit, ms, code, error, stderr) in rows {
        println!(
            "  attempt {attempt}: {state} on {worker}, exit {}, {} ms{}",
            exit.map_or("-".into(), |c| c.to_string()),
            ms.map_or("-".into(), |m| m.to_string()),
            code.map(|c| format!(", {c}: {}", error.unwrap_or_default()))
                .unwrap_or_default()
        );
        if let Some(t) = stderr.filter(|t| !t.is_empty()) {
            let last: Vec<&str> = t.lines().rev().take(5).collect();
            for l in last.into_iter().rev() {
                println!("      stderr | {l}");
            }
        }
    }
    let saga: Vec<(i32, String, String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT attempt, step, state, worker_id, details FROM saga_log WHERE task_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    if !saga.is_empty() {
        println!("  saga:");
    }
    for (attempt, step, state, worker, details) in saga {
        println!("    #{attempt} {step:<16} {state:<11} {worker} {details}");
    }
    Ok(())
}
