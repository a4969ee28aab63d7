//! The consume loop: pull messages, classify them, write each ready chunk in one transaction,
//! then ack (or terminate poison) — never before the commit.

use crate::persist::{self, Item, ItemKind, Outcome, Raw};
use crate::Ctx;
use async_nats::jetstream::{self, AckKind};
use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use futures::{FutureExt, StreamExt};
use mahavishnu::envelope::{self, headers};
use mahavishnu::{db, task, topology, ErrorCode};
use sha2::Digest as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Consumes until `shutdown` is cancelled, then stops pulling, hands back what it was delivered
/// but had not started, and lets in-flight batches finish (up to the grace period).
///
/// Workers own the consumer: they (re)create the stream and consumer whenever pulling has to
/// start again — at start-up, when the pull stream ends, and after repeated pull errors (a
/// server that lost its store answers with errors, not with an end of stream).
pub async fn consume(
    ctx: Arc<Ctx>,
    js: jetstream::Context,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    /// Consecutive pull errors before the consumer is re-created.
    const MAX_PULL_ERRORS: u32 = 5;
    let w = &ctx.settings.worker;
    let permits = Arc::new(Semaphore::new(w.max_in_flight_batches));
    let mut batches = JoinSet::new();
    let mut leftover = Vec::new();
    'outer: while !shutdown.is_cancelled() {
        let ensure = || async { topology::ensure(&js, &ctx.settings.nats).await };
        let consumer = tokio::select! {
            c = ensure
                .retry(ExponentialBuilder::default().with_max_delay(Duration::from_secs(5)).without_max_times())
                .notify(|e, d| tracing::warn!(error = %format!("{e:#}"), retry_in_ms = d.as_millis() as u64, "JetStream not ready")) => c?,
            () = shutdown.cancelled() => break,
        };
        // Prefetch no more than one batch: a delivered message's ack wait is already running
        // while it waits for a transaction slot.
        let messages = match consumer
            .stream()
            .max_messages_per_batch(w.batch_size)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start pulling; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = shutdown.cancelled() => break,
                }
            }
        };
        ctx.metrics.up.set(1);
        tracing::info!(consumer = %ctx.settings.nats.consumer.durable_name, "worker consuming");
        let mut chunks = messages.ready_chunks(w.batch_size);
        let mut errors_in_a_row = 0;
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p?,
                () = shutdown.cancelled() => {
                    leftover.extend(drain_ready(&mut chunks));
                    break 'outer;
                }
            };
            let chunk = tokio::select! {
                c = chunks.next() => c,
                () = shutdown.cancelled() => {
                    leftover.extend(drain_ready(&mut chunks));
                    break 'outer;
                }
            };
            let Some(chunk) = chunk else {
                ctx.metrics.up.set(0);
                tracing::warn!("message stream ended; re-creating the consumer");
                continue 'outer;
            };
            let mut msgs = Vec::with_capacity(chunk.len());
            for m in chunk {
                match m {
                    Ok(m) => msgs.push(m),
                    Err(e) => {
                        errors_in_a_row += 1;
                        tracing::warn!(error = %e, errors_in_a_row, "pull stream error");
                    }
                }
            }
            if msgs.is_empty() {
                if errors_in_a_row >= MAX_PULL_ERRORS {
                    ctx.metrics.up.set(0);
                    tracing::warn!("repeated pull errors; re-creating the consumer");
                    continue 'outer;
                }
                continue;
            }
            errors_in_a_row = 0;
            let (hooks, msgs): (Vec<_>, Vec<_>) = msgs
                .into_iter()
                .partition(|m| crate::webhooks::is_webhook_subject(&m.subject));
            let ctx = ctx.clone();
            batches.spawn(async move {
                let _permit = permit;
                // Side by side, each with its own in-progress acks: slow webhook bodies must not
                // hold task messages past their ack wait.
                let hooks = async {
                    if !hooks.is_empty() {
                        crate::webhooks::handle_messages(&ctx, hooks).await;
                    }
                };
                let tasks = async {
                    if !msgs.is_empty() {
                        handle_batch(&ctx, msgs).await;
                    }
                };
                tokio::join!(hooks, tasks);
            });
            while let Some(r) = batches.try_join_next() {
                if let Err(e) = r {
                    tracing::error!(error = %e, "batch task failed");
                }
            }
        }
    }
    ctx.metrics.up.set(0);
    // Delivered to us but never started: hand them back now rather than after the ack wait.
    for msg in &leftover {
        let _ = msg.ack_with(AckKind::Nak(Some(HANDBACK_DELAY))).await;
    }
    let grace = Duration::from_secs(w.shutdown_grace_secs);
    tracing::info!(
        in_flight = batches.len(),
        handed_back = leftover.len(),
        "stopped pulling; finishing in-flight batches"
    );
    if tokio::time::timeout(grace, async {
        while batches.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            "in-flight batches did not finish within the grace period; they will be redelivered"
        );
    }
    Ok(())
}

/// Redelivery delay for messages a stopping worker hands back: short, but not zero (a NAK
/// without delay is redelivered at once, possibly to the same stopping worker).
const HANDBACK_DELAY: Duration = Duration::from_millis(100);

/// Messages the pull stream has already received, without waiting for more.
fn drain_ready<S>(chunks: &mut S) -> Vec<jetstream::Message>
where
    S: futures::Stream<
            Item = Vec<Result<jetstream::Message, jetstream::consumer::pull::MessagesError>>,
        > + Unpin,
{
    let mut out = Vec::new();
    while let Some(Some(chunk)) = chunks.next().now_or_never() {
        out.extend(chunk.into_iter().flatten());
    }
    out
}

/// Classifies, writes and acknowledges one chunk. Exposed so tests can drive a single step.
///
/// While the transaction runs, every message of the chunk gets an in-progress ack each third of
/// the ack wait, so a slow transaction (or the one-by-one fallback) is not redelivered to
/// another worker half-way.
pub async fn handle_batch(ctx: &Arc<Ctx>, msgs: Vec<jetstream::Message>) {
    let msgs = Arc::new(msgs);
    let heartbeat = heartbeat(ctx, Arc::clone(&msgs));
    // Shared with the detached transaction without copying payloads.
    let registry = &ctx.settings.repositories;
    let items: Arc<Vec<Item>> = Arc::new(
        msgs.iter()
            .map(|m| check_plan(classify(m, &ctx.limits), registry))
            .collect(),
    );
    for item in items.iter() {
        // The reason can quote body values (decoder messages do); it goes to the dead-letter
        // row, never to the log.
        if let ItemKind::Poison { code, .. } = &item.kind {
            tracing::warn!(message.key = %item.key, stream.seq = item.stream_seq, code = %code, "poison message; dead-lettering (reason in dead_letters)");
        }
    }
    let m = &ctx.metrics;
    m.batch_size.observe(items.len() as f64);
    m.in_flight_batches.inc();
    let started = Instant::now();
    let pool = ctx.pool.clone();
    let batch = Arc::clone(&items);
    let result = db::detached(async move { persist::persist_batch(&pool, &batch).await }).await;
    m.transaction_seconds
        .observe(started.elapsed().as_secs_f64());
    m.in_flight_batches.dec();
    match result {
        Ok(outcomes) => {
            let dispatched = futures::future::join_all(
                items
                    .iter()
                    .zip(&outcomes)
                    .map(|(item, outcome)| dispatch(ctx, item, *outcome)),
            )
            .await;
            for (((msg, outcome), item), sent) in
                msgs.iter().zip(outcomes).zip(items.iter()).zip(dispatched)
            {
                if outcome == Outcome::DeadLettered && matches!(item.kind, ItemKind::Task { .. }) {
                    tracing::warn!(message.key = %item.key, code = %ErrorCode::IdempotencyConflict, "idempotency key reused with a different task; the first stands");
                }
                if sent {
                    settle(ctx, msg, outcome).await;
                } else {
                    nak(ctx, msg).await;
                }
            }
        }
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, messages = msgs.len(), "transient database error; redelivering later");
            for msg in msgs.iter() {
                nak(ctx, msg).await;
            }
        }
        Err(e) => {
            // Something validation did not foresee. Write one by one so that a single bad
            // message cannot hold up the others.
            tracing::warn!(error = %e, messages = msgs.len(), "batch failed; retrying one by one");
            for (msg, item) in msgs.iter().zip(items.iter()) {
                handle_one(ctx, msg, item.clone()).await;
            }
        }
    }
    heartbeat.abort();
}

/// Sends an in-progress ack for every message each third of the ack wait until aborted.
pub fn heartbeat(ctx: &Ctx, msgs: Arc<Vec<jetstream::Message>>) -> tokio::task::JoinHandle<()> {
    let every = Duration::from_secs(ctx.settings.nats.consumer.ack_wait_secs) / 3;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            for m in msgs.iter() {
                let _ = m.ack_with(AckKind::Progress).await;
            }
        }
    })
}

async fn handle_one(ctx: &Arc<Ctx>, msg: &jetstream::Message, item: Item) {
    let pool = ctx.pool.clone();
    let one = vec![item.clone()];
    let result = db::detached(async move { persist::persist_batch(&pool, &one).await }).await;
    match result {
        Ok(outcomes) => {
            if dispatch(ctx, &item, outcomes[0]).await {
                settle(ctx, msg, outcomes[0]).await;
            } else {
                nak(ctx, msg).await;
            }
        }
        Err(e) if e.is_transient() => nak(ctx, msg).await,
        Err(e) => {
            tracing::error!(error = %e, message.key = %item.key, "message cannot be written; dead-lettering");
            let pool = ctx.pool.clone();
            let reason = format!("the database refused the task: {}", db_reason(&e));
            let r = db::detached(async move {
                persist::dead_letter_one(&pool, &item, ErrorCode::TaskCreationFailed, reason).await
            })
            .await;
            match r {
                Ok(()) => settle(ctx, msg, Outcome::DeadLettered).await,
                Err(e) => {
                    // Never drop a message: keep it until the dead letter can be written.
                    tracing::error!(error = %e, "dead letter could not be written; redelivering");
                    nak(ctx, msg).await;
                }
            }
        }
    }
}

/// The database's own words for a permanent failure, without values from the row.
fn db_reason(e: &db::TxError) -> String {
    match e {
        db::TxError::Db(sqlx::Error::Database(d)) => format!(
            "{} ({})",
            d.constraint().unwrap_or("no constraint"),
            d.code().as_deref().unwrap_or("no code")
        ),
        other => other.to_string(),
    }
}

async fn settle(ctx: &Ctx, msg: &jetstream::Message, outcome: Outcome) {
    let (kind, label) = match outcome {
        Outcome::Persisted => (AckKind::Ack, "persisted"),
        Outcome::Duplicate => (AckKind::Ack, "duplicate"),
        // The dead letter is committed; only now remove the message.
        Outcome::DeadLettered => (AckKind::Term, "dead_lettered"),
    };
    ctx.metrics.messages_total.with_label_values(&[label]).inc();
    if let Err(e) = msg.ack_with(kind).await {
        // Harmless: the message is redelivered and the ledger recognises it.
        tracing::warn!(error = %e, "ack failed after commit");
    }
}

/// Redelivery delay after `deliveries` attempts: exponential from `nak_delay_ms` up to
/// `nak_max_delay_ms`, with jitter so that a fleet recovering from an outage does not retry in
/// lockstep.
pub fn nak_delay(w: &mahavishnu::config::WorkerSettings, deliveries: i64) -> Duration {
    // The delay reaches the cap long before 32 doublings; walking further would only cost time
    // (the iterator is lazy, and a delivery count can be huge).
    let n = usize::try_from((deliveries.max(1) - 1).min(32)).unwrap_or(0);
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(w.nak_delay_ms))
        .with_max_delay(Duration::from_millis(w.nak_max_delay_ms))
        .with_jitter()
        .without_max_times()
        .build()
        .nth(n)
        .unwrap_or(Duration::from_millis(w.nak_max_delay_ms))
}

/// NAKs with the backoff delay for the message's delivery count.
pub async fn nak(ctx: &Ctx, msg: &jetstream::Message) {
    ctx.metrics
        .messages_total
        .with_label_values(&["retried"])
        .inc();
    let deliveries = msg.info().map(|i| i.delivered).unwrap_or(1);
    let delay = nak_delay(&ctx.settings.worker, deliveries);
    // Always with a delay: a bare NAK redelivers at once.
    if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
        tracing::warn!(error = %e, "nak failed; the message will be redelivered after ack wait");
    }
}

/// Refuses a task that names what the repository registry does not have (`MHV-200`, `201`,
/// `203`): the gateway checks this too, but producers can bypass it.
pub fn check_plan(
    item: Item,
    registry: &std::collections::BTreeMap<String, mahavishnu::registry::Repository>,
) -> Item {
    let ItemKind::Task { task, raw, .. } = &item.kind else {
        return item;
    };
    match mahavishnu::registry::plan_for(registry, task) {
        Ok(_) => item,
        Err(e) => Item {
            kind: ItemKind::Poison {
                code: e.code,
                reason: format!("{}: {}", e.field, e.message),
                raw: raw.clone(),
            },
            ..item
        },
    }
}

/// After the commit, asks the executors to run a task that has something to run. Also for a
/// duplicate: the first delivery may have committed and then died before its request was
/// published (a second request is harmless). False when the request was not confirmed: the
/// message is then NAKed, and its redelivery publishes again.
pub async fn dispatch(ctx: &Ctx, item: &Item, outcome: Outcome) -> bool {
    let ItemKind::Task { task_id, task, .. } = &item.kind else {
        return true;
    };
    if outcome == Outcome::DeadLettered {
        return true;
    }
    request_execution(ctx, *task_id, task).await
}

/// Publishes the execution request of a new task if the registry gives it something to run.
pub async fn request_execution(ctx: &Ctx, task_id: uuid::Uuid, task: &task::NewTask) -> bool {
    if !matches!(
        mahavishnu::registry::plan_for(&ctx.settings.repositories, task),
        Ok(Some(_))
    ) {
        return true;
    }
    match mahavishnu::task::control::request_execution(
        &ctx.js,
        &task.repository,
        task_id,
        &format!("exec:{task_id}"),
    )
    .await
    {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, task.id = %task_id, "execution request not confirmed; redelivering the task message");
            false
        }
    }
}

/// Decodes and validates one message. Never fails: what cannot succeed becomes `Poison`.
pub fn classify(msg: &jetstream::Message, limits: &task::Limits) -> Item {
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let (stream, seq, deliveries, stored_at) = match msg.info() {
        Ok(i) => (
            i.stream.to_owned(),
            i.stream_sequence,
            i.delivered,
            i.published,
        ),
        // Not a JetStream delivery (cannot happen on a pull consumer): key on the content.
        Err(_) => (
            format!("raw-{}", hex::encode(sha2::Sha256::digest(&msg.payload))),
            0,
            1,
            chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
        ),
    };
    let raw = Raw {
        subject: msg.subject.to_string(),
        headers: headers_json(msg.headers.as_ref()),
        payload: msg.payload.clone(),
    };
    let msg_id = header(headers::MSG_ID);
    let decoded = envelope::decode(
        &msg.subject,
        header(headers::CONTENT_TYPE).as_deref(),
        msg_id.as_deref(),
        header(headers::PRODUCER).as_deref(),
        (&stream, seq),
        stored_at,
        &msg.payload,
    );
    let fallback_key = || envelope::producer_key(msg_id.as_deref(), (&stream, seq), stored_at);
    match decoded {
        Err(e) => Item {
            key: fallback_key(),
            stream_seq: seq,
            deliveries,
            kind: ItemKind::Poison {
                code: e.code(),
                reason: e.to_string(),
                raw,
            },
        },
        Ok(inc) => match task::validate(&inc.request, limits, inc.accepted_at) {
            Err(fields) => Item {
                key: inc.key,
                stream_seq: seq,
                deliveries,
                kind: ItemKind::Poison {
                    code: ErrorCode::Validation,
                    reason: fields
                        .iter()
                        .map(|f| format!("{}: {}", f.field, f.problem))
                        .collect::<Vec<_>>()
                        .join("; "),
                    raw,
                },
            },
            Ok(t) => Item {
                kind: ItemKind::Task {
                    task_id: envelope::task_id_for(&inc.key),
                    fingerprint: envelope::fingerprint(&t),
                    task: t,
                    principal: inc.principal,
                    raw,
                },
                key: inc.key,
                stream_seq: seq,
                deliveries,
            },
        },
    }
}

/// Headers as a JSON object of arrays (NUL replaced: jsonb cannot hold it).
pub fn headers_json(h: Option<&async_nats::HeaderMap>) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    if let Some(h) = h {
        for (name, values) in h.iter() {
            let vals: Vec<serde_json::Value> = values
                .iter()
                // jsonb cannot hold NUL: a header that could not be stored would make the
                // dead letter itself fail, and the message would be retried forever.
                .map(|v| serde_json::Value::String(v.as_str().replace('\0', "\u{FFFD}")))
                .collect();
            map.insert(name.to_string(), serde_json::Value::Array(vals));
        }
    }
    serde_json::Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::nak_delay;
    use mahavishnu::config::WorkerSettings;
    use std::time::Duration;

    #[test]
    fn nak_delays_grow_and_are_capped() {
        let w = WorkerSettings {
            nak_delay_ms: 100,
            nak_max_delay_ms: 5_000,
            ..Default::default()
        };
        let first = nak_delay(&w, 1);
        assert!(
            first >= Duration::from_millis(100) && first <= Duration::from_millis(200),
            "{first:?}"
        );
        let fourth = nak_delay(&w, 4);
        assert!(fourth >= Duration::from_millis(800), "{fourth:?}");
        for d in [20, 1_000, i64::MAX] {
            assert!(
                nak_delay(&w, d) <= Duration::from_millis(10_000),
                "jitter stays bounded"
            );
            assert!(nak_delay(&w, d) >= Duration::from_millis(5_000));
        }
        assert!(nak_delay(&w, 0) >= Duration::from_millis(100));
    }
}
