//! # Mahavishnu workers
//!
//! Every replica shares one durable pull consumer. Per message: validate again (producers can
//! bypass the gateway), write ledger row + task + audit row in one transaction, commit, and only
//! then ack. Poison messages are dead-lettered, then terminated. Workers also answer the
//! gateway's reads. On SIGTERM they stop pulling, finish what is in flight and exit.
//!
//! Effectively-once comes from the database ledger, not from JetStream: a redelivered message
//! (after a crash, an expired ack wait or a lost ack) finds its key taken and is acked as a
//! duplicate.

pub mod advisories;
pub mod audit;
pub mod exec;
pub mod ingest;
pub mod metrics;
pub mod persist;
pub mod reads;
pub mod webhooks;

use anyhow::Context as _;
use mahavishnu::config::Settings;
use mahavishnu::task::Limits;
use mahavishnu::{db, topology};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What every part of a worker shares.
#[derive(Debug)]
pub struct Ctx {
    /// Settings.
    pub settings: Settings,
    /// PostgreSQL pool.
    pub pool: sqlx::PgPool,
    /// Connections that hold running tasks' locks (see [`mahavishnu::db::lock_pool`]).
    pub lock_pool: sqlx::PgPool,
    /// NATS client.
    pub nats: async_nats::Client,
    /// JetStream context.
    pub js: async_nats::jetstream::Context,
    /// The claim-check body bucket, opened on first use.
    pub webhook_bodies: LazyBodies,
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// Task field limits.
    pub limits: Limits,
    /// This worker's id in the saga log and audit rows (`host:pid:random`).
    pub worker_id: String,
    /// Tasks this worker runs, for cancellation.
    pub running: Arc<exec::Running>,
    /// One git bookkeeping operation per repository at a time in this worker.
    pub worktree_locks:
        tokio::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Ctx {
    /// Serializes `git worktree add/remove/prune` on one repository within this worker.
    pub async fn worktree_lock(&self, repo: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self
            .worktree_locks
            .lock()
            .await
            .entry(repo.to_owned())
            .or_default()
            .clone();
        m.lock_owned().await
    }
}

/// This machine's name (empty if unknown).
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// A worker id unique across the fleet and across restarts.
fn new_worker_id() -> String {
    let host = Some(host_name())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let r = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &r[..8])
}

/// The claim-check body bucket, opened on first use (ObjectStore has no `Debug`).
#[derive(Default)]
pub struct LazyBodies(pub tokio::sync::OnceCell<async_nats::jetstream::object_store::ObjectStore>);

impl std::fmt::Debug for LazyBodies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.initialized() {
            "LazyBodies(open)"
        } else {
            "LazyBodies(unopened)"
        })
    }
}

/// Runs a worker until `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    let lock_pool = db::lock_pool(&settings.database, settings.execution.max_concurrent)?;
    let nats = topology::connect(&settings.nats.url, "mhv-worker").await?;
    let js = async_nats::jetstream::new(nats.clone());
    let ctx = Arc::new(Ctx {
        metrics: metrics::Metrics::new()?,
        limits: Limits::default(),
        settings,
        pool,
        lock_pool,
        nats,
        js: js.clone(),
        webhook_bodies: LazyBodies::default(),
        worker_id: new_worker_id(),
        running: Arc::default(),
        worktree_locks: tokio::sync::Mutex::default(),
    });

    let metrics_server = if ctx.settings.worker.metrics_listen.is_empty() {
        None
    } else {
        Some(tokio::spawn(serve_metrics(ctx.clone(), shutdown.clone())))
    };

    let reads = tokio::spawn(reads::serve(ctx.clone(), shutdown.clone()));
    let pruner = tokio::spawn(webhooks::prune(ctx.clone(), shutdown.clone()));
    let advisories = tokio::spawn(advisories::capture(ctx.clone(), shutdown.clone()));
    let executor = tokio::spawn(exec::consume(ctx.clone(), shutdown.clone()));
    let consumed = ingest::consume(ctx.clone(), js, shutdown.clone()).await;
    shutdown.cancel();
    match executor.await {
        Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "executor ended with an error"),
        Err(e) => tracing::error!(error = %e, "executor panicked"),
        Ok(Ok(())) => {}
    }
    let _ = pruner.await;
    let _ = advisories.await;
    if let Ok(Err(e)) = reads.await {
        tracing::warn!(error = %format!("{e:#}"), "read service ended with an error");
    }
    // Acks are buffered publishes: flush them before the connection goes.
    ctx.nats.flush().await.context("flushing acks")?;
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    ctx.pool.close().await;
    ctx.lock_pool.close().await;
    tracing::info!("worker stopped");
    consumed
}

async fn serve_metrics(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    use axum::routing::get;
    let addr = ctx.settings.worker.metrics_listen.clone();
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, listen = %addr, "metrics endpoint disabled: cannot bind");
            return;
        }
    };
    let m = ctx.clone();
    let app = axum::Router::new()
        .route("/metrics", get(move || async move { m.metrics.render() }))
        .route("/healthz", get(|| async { "ok" }));
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}
