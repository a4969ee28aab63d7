//! `mhv dlq`: list, show and replay dead letters.
//!
//! Two kinds live in `dead_letters`:
//! - **failed tasks** (`task_id` set; MHV-2xx codes): the task ran and cannot succeed as it is.
//!   Replay queues the task again with a fresh attempt budget (once the cause is repaired);
//! - **messages that could not become tasks** (no `task_id`; MHV-0xx/1xx/3xx codes): replay
//!   publishes the stored message again (or a repaired body given with `--payload`).
//!
//! A replay is keyed by the dead letter, not by the run: replaying the same dead letter twice
//! yields one effect (the second finds it marked, or the task ledger finds the key taken).

use crate::cli::tasks::cli_actor;
use crate::config::Settings;
use crate::task::control::{self, RetryOutcome};
use crate::{db, topology};
use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use std::path::PathBuf;

/// `mhv dlq …`.
#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// The most recent dead letters.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Only this code (e.g. MHV-204).
        #[arg(long)]
        code: Option<String>,
        /// Include replayed ones.
        #[arg(long)]
        all: bool,
    },
    /// One dead letter in full: code, reason, headers, payload, and the task's last attempt.
    Show {
        /// Dead-letter id (from `mhv dlq list`).
        id: i64,
    },
    /// Replay a dead letter once its cause is repaired. Running it twice yields one effect.
    Replay {
        /// Dead-letter id.
        id: i64,
        /// A repaired body to publish instead of the stored one (messages only, not failed
        /// tasks).
        #[arg(long)]
        payload: Option<PathBuf>,
    },
}

/// Runs a `mhv dlq` command.
pub async fn run(s: Settings, cmd: DlqCommand) -> anyhow::Result<()> {
    let pool = db::pool(&s.database)?;
    match cmd {
        DlqCommand::List { limit, code, all } => {
            if !(1..=10_000).contains(&limit) {
                anyhow::bail!("MHV-003: --limit must be within 1..=10000");
            }
            list(&pool, limit, code, all).await
        }
        DlqCommand::Show { id } => show(&pool, id).await,
        DlqCommand::Replay { id, payload } => replay(&s, &pool, id, payload).await,
    }
}

type Row = (
    i64,
    String,
    String,
    Option<uuid::Uuid>,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

async fn list(
    pool: &sqlx::PgPool,
    limit: i64,
    code: Option<String>,
    all: bool,
) -> anyhow::Result<()> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, error_code, subject, task_id, reason, created_at, replayed_at FROM dead_letters
         WHERE ($1::text IS NULL OR error_code = $1) AND ($2 OR replayed_at IS NULL)
         ORDER BY id DESC LIMIT $3",
    )
    .bind(code)
    .bind(all)
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("MHV-002: reading dead_letters")?;
    if rows.is_empty() {
        println!(
            "no dead letters{}",
            if all { "" } else { " awaiting replay" }
        );
    }
    for (id, code, subject, task, reason, at, replayed) in rows {
        let what = task.map_or_else(|| format!("message on {subject}"), |t| format!("task {t}"));
        let reason: String = reason.chars().take(120).collect();
        println!(
            "{id:>6}  {code}  {}  {what}  {reason}{}",
            at.format("%Y-%m-%d %H:%M:%S"),
            replayed.map_or(String::new(), |r| format!(
                "  (replayed {})",
                r.format("%Y-%m-%d %H:%M:%S")
            ))
        );
    }
    Ok(())
}

async fn show(pool: &sqlx::PgPool, id: i64) -> anyhow::Result<()> {
    type Full = (
        String,
        String,
        String,
        Option<uuid::Uuid>,
        serde_json::Value,
        Vec<u8>,
        Option<i64>,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
    );
    let row: Option<Full> = sqlx::query_as(
        "SELECT message_key, error_code, reason, task_id, headers, payload, deliveries, created_at, replayed_at
         FROM dead_letters WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .context("MHV-002: reading dead_letters")?;
    let Some((key, code, reason, task, headers, payload, deliveries, at, replayed)) = row else {
        anyhow::bail!("MHV-100: no dead letter {id} (see `mhv dlq list --all`)");
    };
    println!("dead letter {id}");
    println!("  code        {code}");
    println!("  reason      {reason}");
    println!("  key         {key}");
    println!("  at          {at}");
    println!("  deliveries  {}", deliveries.unwrap_or(0));
    println!(
        "  replayed    {}",
        replayed.map_or("no".into(), |r| r.to_string())
    );
    if let Some(t) = task {
        println!("  task        {t}   (all attempts: mhv tasks runs {t})");
        type LastRun = (i32, String, Option<i32>, Option<String>, Option<String>);
        let last: Option<LastRun> = sqlx::query_as(
            "SELECT attempt, state, exit_code, error, stderr_tail FROM task_runs
                 WHERE task_id = $1 ORDER BY attempt DESC LIMIT 1",
        )
        .bind(t)
        .fetch_optional(pool)
        .await?;
        if let Some((attempt, state, exit, error, stderr)) = last {
            println!(
                "  last run    attempt {attempt}: {state}, exit {}, {}",
                exit.map_or("-".into(), |c| c.to_string()),
                error.unwrap_or_default()
            );
            for l in stderr
                .unwrap_or_default()
                .lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                println!("      stderr | {l}");
            }
        }
    }
    println!("  headers     {headers}");
    let text = String::from_utf8_lossy(&payload);
    let shown: String = text.chars().take(4_000).collect();
    println!("  payload     ({} bytes) {shown}", payload.len());
    Ok(())
}

async fn replay(
    s: &Settings,
    pool: &sqlx::PgPool,
    id: i64,
    payload: Option<PathBuf>,
) -> anyhow::Result<()> {
    type Stored = (
        Option<uuid::Uuid>,
        String,
        String,
        serde_json::Value,
        Vec<u8>,
        Option<DateTime<Utc>>,
    );
    let row: Option<Stored> = sqlx::query_as(
        "SELECT task_id, error_code, subject, headers, payload, replayed_at FROM dead_letters WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .context("MHV-002: reading dead_letters")?;
    let Some((task, code, subject, headers, stored, replayed)) = row else {
        anyhow::bail!("MHV-100: no dead letter {id} (see `mhv dlq list --all`)");
    };
    let nats = topology::connect(&s.nats.url, "mhv-cli").await?;
    let js = async_nats::jetstream::new(nats);
    if let Some(task) = task {
        if payload.is_some() {
            anyhow::bail!("MHV-003: --payload applies to messages; a failed task is replayed as it is stored (repair the repository or the configuration instead)");
        }
        topology::ensure_exec_stream_exists(&js, s).await?;
        let details = serde_json::json!({"dead_letter": id});
        return match control::retry(pool, &js, s, task, &cli_actor(), details, Some(id)).await {
            Ok(RetryOutcome::Queued) => {
                println!("dead letter {id}: task {task} queued again");
                Ok(())
            }
            Ok(RetryOutcome::AlreadyQueued) => {
                println!("dead letter {id} was replayed already; task {task} is still queued (its request was sent again)");
                Ok(())
            }
            Ok(RetryOutcome::AlreadyReplayed(st)) => {
                println!(
                    "dead letter {id} was replayed already; task {task} is {} — nothing done",
                    st.as_str()
                );
                Ok(())
            }
            Err(control::ControlError(e)) => anyhow::bail!("{}: {}", e.code, e.message),
        };
    }
    // A message: publish it again, keyed by the dead letter, to the subject it came from.
    if code == crate::ErrorCode::IdempotencyConflict.as_str() && payload.is_none() {
        anyhow::bail!("MHV-106: dead letter {id} reused an idempotency key with a different body; replaying it cannot succeed (the first request with that key stands). Submit it as a new task with a new key");
    }
    if !topology::STREAM_SUBJECTS.contains(&subject.as_str()) {
        anyhow::bail!("MHV-003: dead letter {id} came from {subject:?}, which cannot be replayed");
    }
    let body = match payload {
        Some(p) => std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
        None => stored,
    };
    let mut h = async_nats::HeaderMap::new();
    let mut has_id = false;
    if let Some(map) = headers.as_object() {
        for (name, values) in map {
            has_id |= name.eq_ignore_ascii_case("Nats-Msg-Id");
            for v in values.as_array().into_iter().flatten() {
                if let Some(v) = v.as_str() {
                    h.append(name.as_str(), v);
                }
            }
        }
    }
    // The message keeps its key, so the task ledger makes at most one task of it however often
    // it is replayed: a producer's Nats-Msg-Id is kept; a message that had none is keyed by the
    // dead letter. Gateway envelopes and webhook deliveries carry their key inside.
    if !has_id {
        h.insert("Nats-Msg-Id", format!("dlq-{id}").as_str());
    }
    let ack = js
        .publish_with_headers(subject.clone(), h, body.into())
        .await?
        .await
        .context("MHV-007: JetStream did not acknowledge the replayed message")?;
    if ack.duplicate && replayed.is_some() {
        println!("dead letter {id} was replayed already and JetStream still holds that replay; nothing done");
        return Ok(());
    }
    if ack.duplicate {
        anyhow::bail!("MHV-007: JetStream still remembers this message id (nats.stream.duplicate_window_secs) and dropped the replay; run the same command again after the window");
    }
    sqlx::query("UPDATE dead_letters SET replayed_at = now() WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    println!(
        "dead letter {id}: message republished on {subject}{}",
        if replayed.is_some() {
            " (replayed before: the ledger keeps it to one task)"
        } else {
            ""
        }
    );
    Ok(())
}
