//! One execution request, start to verdict.
//!
//! 1. **Look**: the task must be `queued` (or `running`, see takeover); anything else is acked.
//! 2. **Lock**: a transaction on a connection of its own takes the task's execution lock
//!    (`pg_try_advisory_xact_lock`) and, if the repository has a fleet-wide limit, one of its
//!    slot locks. The transaction stays open for the whole attempt: the locks live exactly as long
//!    as this worker's database session, so a worker that dies (SIGKILL, lost host) frees them at
//!    once, and a paused one (SIGSTOP) keeps them. Lock busy: someone alive runs the task (or the
//!    repository is full): NAK with a delay, no attempt spent.
//! 3. **Takeover**: a task still `running` whose lock we could take belongs to a dead worker.
//!    Its in-flight attempt is compensated — stale worktree removed, attempt marked
//!    `abandoned`, saga step `takeover/compensated` — and the task goes back to `queued`.
//! 4. **Start**: `queued → running` plus the `task_runs` row and saga step, committed; then the
//!    worktree, the command in its own process group, the gates, and the worktree's removal, each
//!    recorded in the saga log as it happens. In-progress acks go out every third of the ack wait.
//! 5. **Verdict**, written in the lock transaction and committed before the request is acked:
//!    completed; requeued (passing failure, NAK with exponential backoff); or failed and
//!    dead-lettered (permanent failure, or attempts exhausted; then TERM). A worker whose session
//!    was cut off cannot commit a verdict: the attempt is taken over instead.

use super::{process, worktree};
use crate::persist::{self, DeadLetter, Raw};
use crate::Ctx;
use async_nats::jetstream::{self, AckKind};
use mahavishnu::error::ErrorCode;
use mahavishnu::registry::{self, Plan};
use mahavishnu::task::lifecycle::{self, Transition, TransitionError};
use mahavishnu::task::Status;
use mahavishnu::topology::ExecRequest;
use serde_json::{json, Value};
use sha2::Digest as _;
use sqlx::types::Json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How the request is settled once the verdict is committed.
#[derive(Debug)]
enum Settle {
    Ack,
    Term,
    Nak(Duration),
}

/// How an attempt ended.
#[derive(Debug)]
enum Verdict {
    Completed,
    Cancelled,
    /// This worker is stopping: back to the queue at once, no attempt counted against the task.
    Interrupted,
    /// May succeed later.
    Transient(ErrorCode, String),
    /// Will not succeed as it is.
    Permanent(ErrorCode, String),
}

/// Handles one execution request and settles it.
pub async fn handle(ctx: Arc<Ctx>, msg: jetstream::Message, stop: CancellationToken) {
    let msg = Arc::new(msg);
    let settle = match serde_json::from_slice::<ExecRequest>(&msg.payload) {
        Err(e) => dead_letter_request(&ctx, &msg, format!("not an execution request: {e}")).await,
        Ok(req) => match attempt(&ctx, &msg, req.task_id, &stop).await {
            Ok(s) => s,
            Err(e) => {
                let deliveries = msg.info().map(|i| i.delivered).unwrap_or(1);
                tracing::warn!(error = %e, task.id = %req.task_id, "execution step failed; the request is redelivered");
                Settle::Nak(crate::ingest::nak_delay(&ctx.settings.worker, deliveries))
            }
        },
    };
    let label = match &settle {
        Settle::Ack => "acked",
        Settle::Term => "terminated",
        Settle::Nak(_) => "nacked",
    };
    ctx.metrics
        .exec_requests_total
        .with_label_values(&[label])
        .inc();
    let r = match settle {
        Settle::Ack => msg.ack_with(AckKind::Ack).await,
        Settle::Term => msg.ack_with(AckKind::Term).await,
        Settle::Nak(d) => msg.ack_with(AckKind::Nak(Some(d))).await,
    };
    if let Err(e) = r {
        // Harmless: the redelivery finds the verdict in the database.
        tracing::warn!(error = %e, "settling an execution request failed");
    }
}

/// The lock key of a task's execution.
fn task_lock_key(id: Uuid) -> i64 {
    lock_key(&format!("mhv:task:{id}"))
}

/// The lock key of slot `slot` of a repository's fleet-wide limit.
fn slot_lock_key(repository: &str, slot: u32) -> i64 {
    lock_key(&format!("mhv:repo:{repository}:{slot}"))
}

fn lock_key(name: &str) -> i64 {
    let d = sha2::Sha256::digest(name.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_be_bytes(b)
}

async fn try_lock(conn: &mut sqlx::PgConnection, key: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(key)
        .fetch_one(conn)
        .await
}

async fn attempt(
    ctx: &Arc<Ctx>,
    msg: &Arc<jetstream::Message>,
    id: Uuid,
    stop: &CancellationToken,
) -> Result<Settle, sqlx::Error> {
    let exec = &ctx.settings.execution;
    // 1. Look.
    let row: Option<(String, String, Json<Value>)> =
        sqlx::query_as("SELECT status, repository, metadata FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_optional(&ctx.pool)
            .await?;
    let Some((status, repository, metadata)) = row else {
        return Ok(dead_letter_request(ctx, msg, format!("no task {id} (deleted?)")).await);
    };
    let status = Status::parse(&status);
    // A cancelled task whose worker died mid-run still has its attempt (and maybe its
    // command) to clean up.
    let orphaned = status == Some(Status::Cancelled) && {
        let running: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM task_runs WHERE task_id = $1 AND state = 'running')",
        )
        .bind(id)
        .fetch_one(&ctx.pool)
        .await?;
        running
    };
    if !orphaned && !matches!(status, Some(Status::Queued | Status::Running)) {
        return Ok(Settle::Ack);
    }
    let plan = registry::resolve(
        &ctx.settings.repositories,
        &repository,
        registry::requested_action(&metadata.0),
    );
    let plan = match plan {
        Ok(Some(p)) => Ok(p),
        // The registry changed since the task was accepted and it now runs nothing: a queued
        // task stays queued as a record; one in flight on a dead worker is still taken over
        // (and then fails: there is nothing to run).
        Ok(None) if status == Some(Status::Queued) => return Ok(Settle::Ack),
        Ok(None) => Err(registry::PlanError {
            code: ErrorCode::RepositoryNotConfigured,
            field: "metadata.action",
            message: format!(
                "repository {repository:?} no longer gives this task an action to run"
            ),
        }),
        Err(e) => Err(e),
    };

    // 2. Lock, for the whole attempt, on a connection of the lock pool (one per slot of this
    // worker, with TCP keepalives: a lost host's locks are freed within about a minute).
    let mut lock = ctx.lock_pool.begin().await?;
    sqlx::query("SET LOCAL idle_in_transaction_session_timeout = 0")
        .execute(&mut *lock)
        .await?;
    if !try_lock(&mut lock, task_lock_key(id)).await? {
        // Its owner is alive (maybe paused): look again after an ack wait.
        return Ok(Settle::Nak(Duration::from_secs(exec.ack_wait_secs)));
    }
    if orphaned {
        // Its owner is dead (we hold its lock): clean up, keep the task cancelled.
        take_over(ctx, id, plan.as_ref().ok(), false).await?;
        return Ok(Settle::Ack);
    }
    if let Ok(p) = &plan {
        if p.repo.max_concurrent > 0 {
            let mut got = false;
            for slot in 0..p.repo.max_concurrent {
                if try_lock(&mut lock, slot_lock_key(p.repository, slot)).await? {
                    got = true;
                    break;
                }
            }
            if !got {
                let wait = Duration::from_millis(exec.slot_wait_ms);
                return Ok(Settle::Nak(wait + jitter(wait / 2)));
            }
        }
    }
    // Under the lock, the status is settled: only we can start or finish it now.
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *lock)
        .await?;
    match status.as_deref().and_then(Status::parse) {
        Some(Status::Queued) => {}
        Some(Status::Running) => take_over(ctx, id, plan.as_ref().ok(), true).await?,
        _ => return Ok(Settle::Ack),
    }
    // A duplicate request (a replay, a republished request) must not cut a retry's backoff
    // short: wait out what is left of it.
    let backoff_left_ms: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM (created_at - now()))::float8 * 1000 + (details->>'retry_in_ms')::float8
         FROM task_audit_log WHERE task_id = $1 AND event IN ('task_requeued', 'task_retried')
         ORDER BY id DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(&mut *lock)
    .await?
    .flatten();
    if let Some(left) = backoff_left_ms.filter(|l| *l > 50.0) {
        return Ok(Settle::Nak(Duration::from_millis(left as u64)));
    }

    // 4. Start. Registered for cancel broadcasts before the task can be running.
    let cancel = stop.child_token();
    let _registered = ctx.running.register(id, cancel.clone());
    let worker = ctx.worker_id.as_str();
    let actor = format!("worker:{worker}");
    let attempt_no: i32 = sqlx::query_scalar(
        "SELECT coalesce(max(attempt), 0) + 1 FROM task_runs WHERE task_id = $1",
    )
    .bind(id)
    .fetch_one(&ctx.pool)
    .await?;
    let action_name = plan.as_ref().map(|p| p.action_name).unwrap_or("-");
    {
        let mut tx = ctx.pool.begin().await?;
        match lifecycle::apply(
            &mut tx,
            id,
            Transition::Start,
            &actor,
            json!({"attempt": attempt_no, "action": action_name, "worker": worker}),
        )
        .await
        {
            Ok(_) => {}
            Err(TransitionError::Db(e)) => return Err(e),
            // Cancelled (or finished) in the meantime: nothing to run.
            Err(_) => return Ok(Settle::Ack),
        }
        sqlx::query(
            "INSERT INTO task_runs (task_id, attempt, worker_id, action) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(attempt_no)
        .bind(worker)
        .bind(action_name)
        .execute(&mut *tx)
        .await?;
        saga(
            &mut tx,
            id,
            attempt_no,
            "attempt",
            "started",
            worker,
            json!({"action": action_name}),
        )
        .await?;
        tx.commit().await?;
    }
    ctx.metrics.exec_running.inc();
    let _running = GaugeGuard(&ctx.metrics.exec_running);
    let _heartbeat = AbortOnDrop(heartbeat(ctx, Arc::clone(msg), id, cancel.clone()));
    // The lock connection is watched while the attempt runs: if it is lost, so is the lock, and
    // another worker may take the task over — stop the command now.
    let lost = CancellationToken::new();
    let done = CancellationToken::new();
    let watch = async {
        loop {
            tokio::select! {
                () = done.cancelled() => return,
                () = tokio::time::sleep(LOCK_PING) => {}
            }
            let ping =
                tokio::time::timeout(LOCK_PING * 2, sqlx::query("SELECT 1").execute(&mut *lock))
                    .await;
            if !matches!(ping, Ok(Ok(_))) {
                tracing::warn!(task.id = %id, "lost the database session holding the task's lock; stopping the command");
                lost.cancel();
                cancel.cancel();
                return;
            }
        }
    };
    let run = async {
        let r = run_attempt(ctx, id, attempt_no, &plan, &cancel, stop).await;
        done.cancel();
        r
    };
    let (result, ()) = tokio::join!(run, watch);
    let (verdict, record) = result?;
    if lost.is_cancelled() {
        // No verdict can be committed without the lock: the redelivery takes the attempt over.
        return Ok(Settle::Nak(Duration::from_secs(1)));
    }

    // 5. Verdict, in the lock transaction: it commits only if our session (and so our lock)
    // survived the attempt.
    let max_attempts = plan.as_ref().map(|p| p.action.max_attempts).unwrap_or(1);
    let used = attempts_used(&mut *lock, id).await?;
    let verdict = match verdict {
        Verdict::Transient(code, why) if used >= i64::from(max_attempts) => Verdict::Permanent(
            code,
            format!("{why} (attempt {used} of {max_attempts}; no attempts left)"),
        ),
        v => v,
    };
    let state = match &verdict {
        Verdict::Completed => "succeeded",
        Verdict::Cancelled => "cancelled",
        Verdict::Interrupted => "interrupted",
        Verdict::Transient(ErrorCode::ActionTimedOut, _)
        | Verdict::Permanent(ErrorCode::ActionTimedOut, _) => "timed_out",
        Verdict::Permanent(ErrorCode::QualityGateFailed, _) => "gate_failed",
        Verdict::Transient(..) | Verdict::Permanent(..) => "failed",
    };
    let (code, why) = match &verdict {
        Verdict::Transient(c, w) | Verdict::Permanent(c, w) => (Some(c.as_str()), Some(w.as_str())),
        _ => (None, None),
    };
    sqlx::query(
        "UPDATE task_runs SET state = $3, exit_code = $4, signal = $5, duration_ms = $6,
                stdout_tail = $7, stderr_tail = $8, stdout_bytes = $9, stderr_bytes = $10,
                error_code = $11, error = $12, finished_at = clock_timestamp()
         WHERE task_id = $1 AND attempt = $2",
    )
    .bind(id)
    .bind(attempt_no)
    .bind(state)
    .bind(record.exit_code)
    .bind(record.signal)
    .bind(record.duration_ms)
    .bind(&record.stdout_tail)
    .bind(&record.stderr_tail)
    .bind(record.stdout_bytes)
    .bind(record.stderr_bytes)
    .bind(code)
    .bind(why)
    .execute(&mut *lock)
    .await?;
    let done = if matches!(verdict, Verdict::Completed) {
        "succeeded"
    } else {
        "failed"
    };
    saga(
        &mut lock,
        id,
        attempt_no,
        "attempt",
        done,
        worker,
        json!({"state": state, "error_code": code}),
    )
    .await?;
    let m = &ctx.metrics;
    let settle = match verdict {
        Verdict::Completed => {
            transition(
                &mut lock,
                id,
                Transition::Complete,
                &actor,
                json!({"attempt": attempt_no, "duration_ms": record.duration_ms}),
            )
            .await?;
            Settle::Ack
        }
        Verdict::Cancelled => Settle::Ack,
        Verdict::Interrupted => {
            transition(
                &mut lock,
                id,
                Transition::Requeue,
                &actor,
                json!({"attempt": attempt_no, "reason": "worker stopping"}),
            )
            .await?;
            Settle::Nak(Duration::from_millis(100))
        }
        Verdict::Transient(code, why) => {
            let delay = ctx
                .settings
                .execution
                .retry_delay(u32::try_from(used + 1).unwrap_or(u32::MAX));
            transition(
                &mut lock,
                id,
                Transition::Requeue,
                &actor,
                json!({"attempt": attempt_no, "error_code": code.as_str(), "reason": why, "retry_in_ms": delay.as_millis() as u64}),
            )
            .await?;
            Settle::Nak(delay)
        }
        Verdict::Permanent(code, why) => {
            let failed = transition(
                &mut lock,
                id,
                Transition::Fail,
                &actor,
                json!({"attempt": attempt_no, "error_code": code.as_str(), "reason": why}),
            )
            .await?;
            if failed {
                dead_letter_task(&mut lock, msg, id, attempt_no, code, &why, &record).await?;
            }
            Settle::Term
        }
    };
    lock.commit().await?;
    m.exec_attempts_total.with_label_values(&[state]).inc();
    tracing::info!(task.id = %id, attempt = attempt_no, state, "attempt finished");
    Ok(settle)
}

/// How often the lock connection is checked during an attempt.
const LOCK_PING: Duration = Duration::from_secs(2);

/// Aborts a background task when dropped (also on early returns and errors).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Decrements a gauge when dropped.
struct GaugeGuard<'a>(&'a prometheus::IntGauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The attempt's body: a plan error fails at once; attempts used up fail at once; otherwise
/// [`execute`].
async fn run_attempt(
    ctx: &Ctx,
    id: Uuid,
    attempt_no: i32,
    plan: &Result<Plan<'_>, registry::PlanError>,
    cancel: &CancellationToken,
    stop: &CancellationToken,
) -> Result<(Verdict, RunRecord), sqlx::Error> {
    match plan {
        Err(e) => Ok((
            Verdict::Permanent(e.code, e.message.clone()),
            RunRecord::default(),
        )),
        Ok(p) => {
            let used = attempts_used(&ctx.pool, id).await?;
            if used > i64::from(p.action.max_attempts) {
                Ok((
                    Verdict::Permanent(
                        ErrorCode::ActionFailed,
                        format!("{} attempts used up (worker crashes count)", used - 1),
                    ),
                    RunRecord::default(),
                ))
            } else {
                Ok(execute(ctx, id, attempt_no, p, cancel, stop).await)
            }
        }
    }
}

/// Applies a transition; a task cancelled meanwhile keeps its status (false).
async fn transition(
    conn: &mut sqlx::PgConnection,
    id: Uuid,
    t: Transition,
    actor: &str,
    details: Value,
) -> Result<bool, sqlx::Error> {
    match lifecycle::apply(conn, id, t, actor, details).await {
        Ok(_) => Ok(true),
        Err(TransitionError::Db(e)) => Err(e),
        Err(e) => {
            tracing::info!(task.id = %id, reason = %e, "verdict not applied to the status");
            Ok(false)
        }
    }
}

/// Attempts since the task was last retried by an operator (each retry brings a fresh budget).
async fn attempts_used<'c, E>(conn: E, id: Uuid) -> Result<i64, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    sqlx::query_scalar(
        "SELECT count(*) FROM task_runs
         WHERE task_id = $1 AND state <> 'interrupted' AND started_at >= coalesce(
             (SELECT max(created_at) FROM task_audit_log WHERE task_id = $1 AND event = 'task_retried'),
             '-infinity')",
    )
    .bind(id)
    .fetch_one(conn)
    .await
}

/// The in-flight attempt of a task whose worker died: remove its worktree, mark it abandoned,
/// record the takeover, and queue the task again.
async fn take_over(
    ctx: &Ctx,
    id: Uuid,
    plan: Option<&Plan<'_>>,
    requeue: bool,
) -> Result<(), sqlx::Error> {
    let stale: Option<(i32, String, Option<String>)> = sqlx::query_as(
        "SELECT attempt, worker_id, worktree FROM task_runs WHERE task_id = $1 AND state = 'running'",
    )
    .bind(id)
    .fetch_optional(&ctx.pool)
    .await?;
    let worker = ctx.worker_id.as_str();
    if stale.is_none() {
        // Nothing in flight (another delivery cleaned it up first, or the attempt never got its
        // row): nothing to compensate.
        if requeue {
            let mut tx = ctx.pool.begin().await?;
            transition(
                &mut tx,
                id,
                Transition::Requeue,
                &format!("worker:{worker}"),
                json!({"reason": "running with no attempt in flight"}),
            )
            .await?;
            tx.commit().await?;
        }
        return Ok(());
    }
    // The dead worker's command may still run (its group is not the worker's): on this host,
    // kill it, once its environment shows it is that attempt's.
    let mut killed = Value::Null;
    if let Some((attempt, _, _)) = &stale {
        let started: Option<Json<Value>> = sqlx::query_scalar(
            "SELECT details FROM saga_log WHERE task_id = $1 AND attempt = $2 AND step = 'command'
             AND state = 'started' ORDER BY id DESC LIMIT 1",
        )
        .bind(id)
        .bind(attempt)
        .fetch_optional(&ctx.pool)
        .await?;
        if let Some(Json(d)) = started {
            let pgid = d["pgid"].as_i64().and_then(|p| i32::try_from(p).ok());
            if let (Some(pgid), true) = (pgid, d["host"].as_str() == Some(host().as_str())) {
                let (task, att) = (id.to_string(), attempt.to_string());
                let ours =
                    process::group_has_env(pgid, &[("MHV_TASK_ID", &task), ("MHV_ATTEMPT", &att)]);
                if ours && process::group_alive(pgid) {
                    process::signal_group(pgid, libc::SIGKILL);
                    killed = json!(pgid);
                }
            }
        }
    }
    // Its worktree: the recorded path, or the one the attempt would have used.
    let mut removed = Value::Null;
    let repository: Option<String> =
        sqlx::query_scalar("SELECT repository FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_optional(&ctx.pool)
            .await?;
    if let (Some((attempt, _, recorded)), Some(repository)) = (&stale, repository) {
        let root = Path::new(&ctx.settings.execution.worktree_root).join(&repository);
        let path = recorded
            .as_ref()
            .map(PathBuf::from)
            .or_else(|| worktree::path_for(&root, &format!("{id}-{attempt}")));
        if let Some(path) = path {
            removed = match plan {
                Some(p) => {
                    let _guard = ctx.worktree_lock(&p.repo.path).await;
                    match worktree::remove(Path::new(&p.repo.path), &path).await {
                        Ok(()) => json!(true),
                        Err(e) => json!(format!("{e}")),
                    }
                }
                // The repository is no longer configured: at least free the disk.
                None => match tokio::fs::remove_dir_all(&path).await {
                    Ok(()) => json!(true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!(true),
                    Err(e) => json!(e.to_string()),
                },
            };
        }
    }
    let mut tx = ctx.pool.begin().await?;
    let (attempt, previous) = match &stale {
        Some((a, w, _)) => (*a, w.as_str()),
        None => (1, ""),
    };
    if stale.is_some() {
        sqlx::query(
            "UPDATE task_runs SET state = 'abandoned', finished_at = now(),
                    error = 'its worker stopped during the attempt; taken over by ' || $3
             WHERE task_id = $1 AND attempt = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(attempt)
        .bind(worker)
        .execute(&mut *tx)
        .await?;
    }
    let details = json!({"previous_worker": previous, "stale_worktree": stale.as_ref().and_then(|s| s.2.clone()),
                         "worktree_removed": removed, "killed_process_group": killed});
    saga(
        &mut tx,
        id,
        attempt,
        "takeover",
        "compensated",
        worker,
        details.clone(),
    )
    .await?;
    if requeue {
        let mut d = details;
        d["reason"] = json!("takeover");
        d["attempt"] = json!(attempt);
        transition(
            &mut tx,
            id,
            Transition::Requeue,
            &format!("worker:{worker}"),
            d,
        )
        .await?;
    }
    tx.commit().await?;
    tracing::warn!(task.id = %id, previous_worker = previous, attempt, "took over a task whose worker died");
    ctx.metrics.exec_takeovers_total.inc();
    Ok(())
}

/// What is recorded of an attempt's command.
#[derive(Debug, Default)]
struct RunRecord {
    exit_code: Option<i32>,
    signal: Option<i32>,
    duration_ms: Option<i64>,
    stdout_tail: Option<String>,
    stderr_tail: Option<String>,
    stdout_bytes: Option<i64>,
    stderr_bytes: Option<i64>,
}

impl RunRecord {
    fn of(o: &process::Outcome) -> Self {
        // PostgreSQL text cannot hold NUL.
        let clean = |s: &str| s.replace('\0', "\u{FFFD}");
        Self {
            exit_code: match o.exit {
                process::Exit::Code(c) => Some(c),
                _ => None,
            },
            signal: match o.exit {
                process::Exit::Signal(s) => Some(s),
                _ => None,
            },
            duration_ms: i64::try_from(o.duration.as_millis()).ok(),
            stdout_tail: Some(clean(&o.stdout_tail)),
            stderr_tail: Some(clean(&o.stderr_tail)),
            stdout_bytes: i64::try_from(o.stdout_bytes).ok(),
            stderr_bytes: i64::try_from(o.stderr_bytes).ok(),
        }
    }
}

/// Worktree, command, gates, cleanup. Database errors abort (the request is redelivered and
/// the attempt taken over); everything else is a verdict.
async fn execute(
    ctx: &Ctx,
    id: Uuid,
    attempt: i32,
    plan: &Plan<'_>,
    cancel: &CancellationToken,
    stop: &CancellationToken,
) -> (Verdict, RunRecord) {
    let exec = &ctx.settings.execution;
    let worker = ctx.worker_id.as_str();
    let actor = format!("worker:{worker}");
    let repo_path = PathBuf::from(&plan.repo.path);
    let root = Path::new(&exec.worktree_root).join(plan.repository);
    let Some(path) = worktree::path_for(&root, &format!("{id}-{attempt}")) else {
        return (
            Verdict::Permanent(
                ErrorCode::WorktreeCreationFailed,
                "bad worktree name".into(),
            ),
            RunRecord::default(),
        );
    };
    let path_text = path.to_string_lossy().into_owned();
    // Recorded before it exists, so a takeover can clean up a half-made one (a takeover also
    // derives the same path from the attempt if this write is lost).
    let recorded = async {
        let mut tx = ctx.pool.begin().await?;
        sqlx::query("UPDATE task_runs SET worktree = $3 WHERE task_id = $1 AND attempt = $2")
            .bind(id)
            .bind(attempt)
            .bind(&path_text)
            .execute(&mut *tx)
            .await?;
        saga(
            &mut tx,
            id,
            attempt,
            "worktree",
            "started",
            worker,
            json!({"path": path_text}),
        )
        .await?;
        tx.commit().await
    };
    if let Err(e) = recorded.await {
        tracing::warn!(task.id = %id, error = %e, "saga step not recorded");
    }
    let created = match tokio::fs::create_dir_all(&root).await {
        Err(e) => Err(format!("cannot create {}: {e}", root.display())),
        Ok(()) => {
            let _guard = ctx.worktree_lock(&plan.repo.path).await;
            worktree::create(&repo_path, &path, &plan.repo.default_branch)
                .await
                .map_err(|e| e.to_string())
        }
    };
    if let Err(why) = created {
        // A half-made one is removed now: no later attempt uses this path.
        {
            let _guard = ctx.worktree_lock(&plan.repo.path).await;
            let _ = worktree::remove(&repo_path, &path).await;
        }
        step(
            ctx,
            id,
            attempt,
            "worktree",
            "failed",
            json!({"path": path_text, "error": why}),
        )
        .await;
        return (
            Verdict::Transient(ErrorCode::WorktreeCreationFailed, why),
            RunRecord::default(),
        );
    }
    step(
        ctx,
        id,
        attempt,
        "worktree",
        "succeeded",
        json!({"path": path_text}),
    )
    .await;
    audit(
        ctx,
        id,
        "worktree_created",
        &actor,
        json!({"attempt": attempt, "path": path_text}),
    )
    .await;

    let env_set = vec![
        ("MHV_TASK_ID".to_owned(), id.to_string()),
        ("MHV_ATTEMPT".to_owned(), attempt.to_string()),
        ("MHV_REPOSITORY".to_owned(), plan.repository.to_owned()),
        ("MHV_ACTION".to_owned(), plan.action_name.to_owned()),
    ];
    let spec = |argv: &[String], timeout_secs: u64, env: &[String]| process::Spec {
        argv: argv.to_vec(),
        cwd: path.clone(),
        env_allow: env.to_vec(),
        env_set: env_set.clone(),
        timeout: Duration::from_secs(timeout_secs),
        output_cap: exec.output_tail_bytes,
        secrets: secrets_of(env),
        kill_grace: Duration::from_millis(exec.kill_grace_ms),
    };
    let a = plan.action;
    let (spawned, pgid) = tokio::sync::oneshot::channel();
    let action_spec = spec(&a.argv, a.timeout_secs, &a.env);
    let command = process::run_notify(&action_spec, cancel, Some(spawned));
    // The group id goes into the saga as soon as the command runs: a takeover on this host
    // kills the group if this worker dies.
    let record_start = async {
        let pgid = pgid.await.ok();
        step(
            ctx,
            id,
            attempt,
            "command",
            "started",
            json!({"action": plan.action_name, "pgid": pgid, "host": host()}),
        )
        .await
    };
    let (ran, ()) = tokio::join!(command, record_start);
    let (mut verdict, record) = match ran {
        Err(e) => (
            Verdict::Transient(ErrorCode::ActionFailed, format!("{e}")),
            RunRecord::default(),
        ),
        Ok(o) => {
            let v = match &o.exit {
                process::Exit::Code(0) => Verdict::Completed,
                process::Exit::Code(c) if a.retryable_exit_codes.contains(c) => Verdict::Transient(
                    ErrorCode::ActionFailed,
                    format!("{} exited with {c} (retryable)", plan.action_name),
                ),
                process::Exit::Code(c) => Verdict::Permanent(
                    ErrorCode::ActionFailed,
                    format!("{} exited with {c}", plan.action_name),
                ),
                process::Exit::Signal(s) => Verdict::Transient(
                    ErrorCode::ActionFailed,
                    format!("{} was killed by signal {s}", plan.action_name),
                ),
                process::Exit::TimedOut => Verdict::Transient(
                    ErrorCode::ActionTimedOut,
                    format!(
                        "{} ran past its {} s timeout; its process group was killed",
                        plan.action_name, a.timeout_secs
                    ),
                ),
                process::Exit::Cancelled if stop.is_cancelled() => Verdict::Interrupted,
                process::Exit::Cancelled => Verdict::Cancelled,
            };
            (v, RunRecord::of(&o))
        }
    };
    let ok = matches!(verdict, Verdict::Completed);
    step(
        ctx,
        id,
        attempt,
        "command",
        if ok { "succeeded" } else { "failed" },
        json!({"exit_code": record.exit_code, "signal": record.signal, "duration_ms": record.duration_ms}),
    )
    .await;

    if ok {
        for (name, gate) in plan.gates() {
            let g = process::run(&spec(&gate.argv, gate.timeout_secs, &gate.env), cancel).await;
            let (passed, detail) = match &g {
                Err(e) => (false, json!({"gate": name, "error": e.to_string()})),
                Ok(o) => (
                    o.succeeded(),
                    json!({"gate": name, "exit": format!("{:?}", o.exit), "duration_ms": o.duration.as_millis() as u64,
                           "stderr_tail": tail(&o.stderr_tail, 2_000).replace('\0', "\u{FFFD}")}),
                ),
            };
            let event = if passed {
                "quality_gate_passed"
            } else {
                "quality_gate_failed"
            };
            let mut d = detail.clone();
            d["attempt"] = json!(attempt);
            audit(ctx, id, event, &actor, d).await;
            step(
                ctx,
                id,
                attempt,
                &format!("gate:{name}"),
                if passed { "succeeded" } else { "failed" },
                detail,
            )
            .await;
            if !passed {
                verdict = match g {
                    Ok(o) if o.exit == process::Exit::Cancelled && stop.is_cancelled() => {
                        Verdict::Interrupted
                    }
                    Ok(o) if o.exit == process::Exit::Cancelled => Verdict::Cancelled,
                    _ => Verdict::Permanent(
                        ErrorCode::QualityGateFailed,
                        format!("quality gate {name} failed"),
                    ),
                };
                break;
            }
        }
    }

    // Removed after failures too. A failed removal is recorded (saga step cleanup/failed) and
    // left on disk: no later attempt uses this path (runbooks/execution.md has the clean-up).
    let removed = {
        let _guard = ctx.worktree_lock(&plan.repo.path).await;
        worktree::remove(&repo_path, &path).await
    };
    match removed {
        Ok(()) => {
            audit(
                ctx,
                id,
                "worktree_removed",
                &actor,
                json!({"attempt": attempt, "path": path_text}),
            )
            .await;
            step(
                ctx,
                id,
                attempt,
                "cleanup",
                "succeeded",
                json!({"path": path_text}),
            )
            .await;
        }
        Err(e) => {
            tracing::warn!(task.id = %id, error = %e, "worktree removal failed");
            step(
                ctx,
                id,
                attempt,
                "cleanup",
                "failed",
                json!({"path": path_text, "error": e.to_string()}),
            )
            .await;
        }
    }
    (verdict, record)
}

/// This machine's name (saga details; a takeover kills a dead worker's process group only on
/// the same host).
fn host() -> String {
    crate::host_name()
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Values of passed-through variables whose names look secret, to redact from output.
fn secrets_of(env: &[String]) -> Vec<String> {
    env.iter()
        .filter(|name| crate::audit::is_secret_like(name))
        .filter_map(|name| std::env::var(name).ok())
        .filter(|v| v.len() >= 4)
        .collect()
}

async fn saga(
    conn: &mut sqlx::PgConnection,
    id: Uuid,
    attempt: i32,
    step: &str,
    state: &str,
    worker: &str,
    details: Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO saga_log (task_id, attempt, step, state, worker_id, details, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, clock_timestamp())",
    )
    .bind(id)
    .bind(attempt)
    .bind(step)
    .bind(state)
    .bind(worker)
    .bind(Json(details))
    .execute(conn)
    .await?;
    Ok(())
}

/// A saga step, committed at once (a takeover must see it even if this worker dies next). A
/// failed write is logged, not fatal: the attempt goes on and its verdict is still written.
async fn step(ctx: &Ctx, id: Uuid, attempt: i32, name: &str, state: &str, details: Value) {
    let r = async {
        let mut conn = ctx.pool.acquire().await?;
        saga(&mut conn, id, attempt, name, state, &ctx.worker_id, details).await
    }
    .await;
    if let Err(e) = r {
        tracing::warn!(task.id = %id, step = name, error = %e, "saga step not recorded");
    }
}

/// An audit row of the attempt (logged, not fatal, if it cannot be written).
async fn audit(ctx: &Ctx, id: Uuid, event: &str, actor: &str, details: Value) {
    let r = sqlx::query(
        "INSERT INTO task_audit_log (task_id, event, actor, details) VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(event)
    .bind(actor)
    .bind(Json(details))
    .execute(&ctx.pool)
    .await;
    if let Err(e) = r {
        tracing::warn!(task.id = %id, event, error = %e, "audit row not written");
    }
}

/// In-progress acks every third of the ack wait, and a look at the task's status every second
/// (a cancel whose broadcast this worker missed).
fn heartbeat(
    ctx: &Arc<Ctx>,
    msg: Arc<jetstream::Message>,
    id: Uuid,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let every = Duration::from_secs(ctx.settings.execution.ack_wait_secs) / 3;
    let pool = ctx.pool.clone();
    tokio::spawn(async move {
        let second = Duration::from_secs(1);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
        let mut last_ack = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            if last_ack.elapsed() + second > every {
                let _ = msg.ack_with(AckKind::Progress).await;
                last_ack = tokio::time::Instant::now();
            }
            let status: Result<Option<String>, _> =
                sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&pool)
                    .await;
            if let Ok(Some(s)) = status {
                if s == Status::Cancelled.as_str() && !cancel.is_cancelled() {
                    tracing::info!(task.id = %id, "task cancelled (seen on heartbeat); stopping it");
                    cancel.cancel();
                }
            }
        }
    })
}

/// The dead letter of a failed task: the request, the code, the reason and the output tail.
async fn dead_letter_task(
    conn: &mut sqlx::PgConnection,
    msg: &jetstream::Message,
    id: Uuid,
    attempt: i32,
    code: ErrorCode,
    why: &str,
    record: &RunRecord,
) -> Result<(), sqlx::Error> {
    let info = msg.info().ok();
    let mut headers = crate::ingest::headers_json(msg.headers.as_ref());
    if let Value::Object(h) = &mut headers {
        h.insert(
            "Mhv-Output-Tail".into(),
            json!([record
                .stderr_tail
                .as_deref()
                .map(|t| tail(t, 4_000))
                .unwrap_or_default()]),
        );
    }
    let raw = Raw {
        subject: msg.subject.to_string(),
        headers,
        payload: msg.payload.clone(),
    };
    let dead = DeadLetter {
        key: format!("exec:{id}:{attempt}"),
        code,
        reason: why.to_owned(),
        seq: info.as_ref().map(|i| i.stream_sequence).unwrap_or(0),
        deliveries: info.as_ref().map(|i| i.delivered).unwrap_or(1),
        raw: &raw,
        task_id: Some(id),
    };
    persist::insert_dead_letters(conn, &[dead]).await
}

/// A request that is not one (only a producer bypassing the gateway can send it).
async fn dead_letter_request(ctx: &Ctx, msg: &jetstream::Message, why: String) -> Settle {
    let info = msg.info().ok();
    let seq = info.as_ref().map(|i| i.stream_sequence).unwrap_or(0);
    // With the store time: sequences restart when the stream is re-created.
    let stored = info
        .as_ref()
        .and_then(|i| i.published.timestamp_nanos_opt())
        .unwrap_or_default();
    let raw = Raw {
        subject: msg.subject.to_string(),
        headers: crate::ingest::headers_json(msg.headers.as_ref()),
        payload: msg.payload.clone(),
    };
    let dead = DeadLetter {
        key: format!("exec-seq:{seq}:{stored}"),
        code: ErrorCode::Validation,
        reason: why,
        seq,
        deliveries: info.as_ref().map(|i| i.delivered).unwrap_or(1),
        raw: &raw,
        task_id: None,
    };
    let r = async {
        let mut conn = ctx.pool.acquire().await?;
        persist::insert_dead_letters(&mut conn, &[dead]).await
    }
    .await;
    match r {
        Ok(_) => Settle::Term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot dead-letter a malformed execution request");
            Settle::Nak(Duration::from_secs(5))
        }
    }
}

/// Up to `max` of random delay, so that waiting requests do not retry in lockstep.
fn jitter(max: Duration) -> Duration {
    let r = Uuid::new_v4().as_u128() as u64;
    let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(r % ms)
}
