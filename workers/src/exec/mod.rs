//! Task execution. Every worker replica pulls execution requests (`mhv.exec.{repository}`)
//! from one shared durable consumer and runs at most `execution.max_concurrent` at once; see
//! [`run`] for one attempt and docs/execution.md for the whole story.
//!
//! - [`process`]: a configured command in its own process group, with a timeout, cancellation
//!   and capped, redacted output;
//! - [`worktree`]: one git worktree per attempt;
//! - [`run`]: the attempt itself — lock, takeover, start, worktree, command, gates, cleanup,
//!   and the verdict, committed before the request is acked.

pub mod process;
pub mod run;
pub mod worktree;

use crate::Ctx;
use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use mahavishnu::topology;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The tasks this worker is running, by id, with the token that cancels each.
#[derive(Debug, Default)]
pub struct Running(Mutex<HashMap<Uuid, CancellationToken>>);

impl Running {
    /// Registers a task; the returned guard unregisters it.
    pub fn register(self: &Arc<Self>, id: Uuid, token: CancellationToken) -> RunningGuard {
        self.lock().insert(id, token);
        RunningGuard {
            running: Arc::clone(self),
            id,
        }
    }

    /// Cancels the task if this worker runs it; true if it did.
    pub fn cancel(&self, id: Uuid) -> bool {
        match self.lock().get(&id) {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, CancellationToken>> {
        // A panic while holding this map cannot leave it inconsistent (single inserts/removes).
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Unregisters a running task when dropped.
#[derive(Debug)]
pub struct RunningGuard {
    running: Arc<Running>,
    id: Uuid,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.running.lock().remove(&self.id);
    }
}

/// Pulls and runs execution requests until `shutdown`. Then it stops pulling, lets running tasks
/// finish for up to `worker.shutdown_grace_secs`, and interrupts the rest: their process groups
/// are killed, the attempts recorded as interrupted, and the tasks handed back to the queue for
/// another replica.
pub async fn consume(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<()> {
    if !ctx.settings.repositories.values().any(|r| r.executable()) {
        tracing::info!("no repository is set up for execution; not consuming execution requests");
        return Ok(());
    }
    // Cancellations are heard until the last running task has ended, not only until shutdown.
    let listening = CancellationToken::new();
    let listener = tokio::spawn(listen_for_cancels(ctx.clone(), listening.clone()));
    let permits = Arc::new(Semaphore::new(ctx.settings.execution.max_concurrent));
    let stop = CancellationToken::new();
    let mut runs = JoinSet::new();
    'outer: while !shutdown.is_cancelled() {
        let ensure = || async { topology::ensure_exec(&ctx.js, &ctx.settings).await };
        let consumer = tokio::select! {
            c = ensure
                .retry(ExponentialBuilder::default().with_max_delay(Duration::from_secs(5)).without_max_times())
                .notify(|e, d| tracing::warn!(error = %format!("{e:#}"), retry_in_ms = d.as_millis() as u64, "execution stream not ready")) => c?,
            () = shutdown.cancelled() => break,
        };
        tracing::info!(consumer = %ctx.settings.execution.consumer, "worker executing");
        let mut errors_in_a_row = 0u32;
        loop {
            // A slot first, then a request: a request is never held while it waits for a slot.
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p?,
                () = shutdown.cancelled() => break 'outer,
            };
            let batch = consumer
                .fetch()
                .max_messages(1)
                .expires(Duration::from_secs(5))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    errors_in_a_row += 1;
                    tracing::warn!(error = %e, errors_in_a_row, "cannot fetch execution requests");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = shutdown.cancelled() => break 'outer,
                    }
                    if errors_in_a_row >= 5 {
                        continue 'outer;
                    }
                    continue;
                }
            };
            let next = tokio::select! {
                m = batch.next() => m,
                () = shutdown.cancelled() => break 'outer,
            };
            match next {
                None => {}
                Some(Err(e)) => {
                    errors_in_a_row += 1;
                    tracing::warn!(error = %e, errors_in_a_row, "execution fetch error");
                    if errors_in_a_row >= 5 {
                        continue 'outer;
                    }
                }
                Some(Ok(msg)) => {
                    errors_in_a_row = 0;
                    let ctx = ctx.clone();
                    let stop = stop.clone();
                    runs.spawn(async move {
                        let _permit = permit;
                        run::handle(ctx, msg, stop).await;
                    });
                }
            }
            while let Some(r) = runs.try_join_next() {
                if let Err(e) = r {
                    tracing::error!(error = %e, "execution task failed");
                }
            }
        }
    }
    let grace = Duration::from_secs(ctx.settings.worker.shutdown_grace_secs);
    tracing::info!(
        running = runs.len(),
        "stopped taking execution requests; letting running tasks finish"
    );
    if tokio::time::timeout(grace, async { while runs.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!(
            running = runs.len(),
            "tasks still running after the grace period; interrupting them (they go back to the queue)"
        );
        stop.cancel();
        while runs.join_next().await.is_some() {}
    }
    listening.cancel();
    let _ = listener.await;
    Ok(())
}

/// Stops tasks this worker runs when someone cancels them (`mhv.control.cancel.{id}`).
async fn listen_for_cancels(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let subject = format!("{}.*", topology::SUBJECT_CANCEL_PREFIX);
    let mut sub = loop {
        match ctx.nats.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to cancellations; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    };
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            () = shutdown.cancelled() => return,
        };
        let Some(msg) = msg else { return };
        let id = msg
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .and_then(|s| Uuid::parse_str(s).ok());
        if let Some(id) = id {
            if ctx.running.cancel(id) {
                tracing::info!(task.id = %id, "cancel received; stopping the task's process group");
            }
        }
    }
}
