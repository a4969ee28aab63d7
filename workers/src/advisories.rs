//! Captures JetStream's MAX_DELIVERIES advisories into the dead-letter store.
//!
//! With a finite `nats.consumer.max_deliver`, JetStream stops delivering a message after that
//! many tries but neither removes it from the work-queue stream nor tells anyone except by a
//! fire-and-forget advisory. A stream captures those advisories (`{stream}_ADVISORIES`); here
//! every worker shares a durable consumer on it and, per advisory: reads the message by its
//! sequence, writes a `MHV-015` dead letter with its subject, headers and bytes, deletes it
//! from the task stream, and only then acks the advisory. `mhv dlq replay` publishes it again.

use crate::persist::{self, DeadLetter, Raw};
use crate::Ctx;
use async_nats::jetstream::{self, consumer, AckKind};
use futures::StreamExt;
use mahavishnu::{topology, ErrorCode};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Durable consumer name on the advisory stream.
pub const CONSUMER: &str = "mhv-advisories";

/// Runs until `shutdown`.
pub async fn capture(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    loop {
        if let Err(e) = capture_once(&ctx, &shutdown).await {
            tracing::warn!(error = %format!("{e:#}"), "advisory capture failed; retrying");
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn capture_once(ctx: &Arc<Ctx>, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let config = topology::advisory_stream_config(&ctx.settings.nats);
    let name = config.name.clone();
    ctx.js.create_or_update_stream(config).await?;
    let consumer: consumer::PullConsumer = ctx
        .js
        .create_consumer_on_stream(
            consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                description: Some(
                    "Mahavishnu workers: MAX_DELIVERIES advisories to dead letters".into(),
                ),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
            &name,
        )
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(16)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await?;
    loop {
        let next = tokio::select! {
            m = messages.next() => m,
            () = shutdown.cancelled() => return Ok(()),
        };
        let Some(msg) = next else { return Ok(()) };
        let msg = msg?;
        match handle(ctx, &msg).await {
            Ok(()) => {
                let _ = msg.ack_with(AckKind::Ack).await;
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "advisory not captured yet; retrying");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(2))))
                    .await;
            }
        }
    }
}

async fn handle(ctx: &Ctx, msg: &jetstream::Message) -> anyhow::Result<()> {
    let Ok(a) = serde_json::from_slice::<topology::MaxDeliveriesAdvisory>(&msg.payload) else {
        tracing::warn!("unreadable MAX_DELIVERIES advisory; dropped");
        return Ok(());
    };
    let stream = ctx.js.get_stream(&a.stream).await?;
    let original = match stream.get_raw_message(a.stream_seq).await {
        Ok(m) => m,
        // Gone already (acked after all, or captured by another worker).
        Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
            return Ok(())
        }
        Err(e) => return Err(e.into()),
    };
    let headers = crate::ingest::headers_json(Some(&original.headers));
    let key = format!(
        "maxdeliver:{}:{}:{}",
        a.stream,
        a.stream_seq,
        original.time.timestamp_nanos_opt().unwrap_or_default()
    );
    let raw = Raw {
        subject: original.subject.to_string(),
        headers,
        payload: original.payload.clone(),
    };
    let dead = DeadLetter {
        key,
        code: ErrorCode::DeliveryLimitReached,
        reason: format!(
            "consumer {} gave up after {} deliveries (nats.consumer.max_deliver); every one failed for a passing reason — see the worker log around that time",
            a.consumer, a.deliveries
        ),
        seq: a.stream_seq,
        deliveries: i64::try_from(a.deliveries).unwrap_or(i64::MAX),
        raw: &raw,
        task_id: None,
    };
    let mut conn = ctx.pool.acquire().await?;
    persist::insert_dead_letters(&mut conn, &[dead]).await?;
    drop(conn);
    // Recorded: now take it out of the work queue, where nothing would ever deliver it again.
    if let Err(e) = stream.delete_message(a.stream_seq).await {
        // Fine if someone removed it meanwhile; otherwise the advisory is retried (the dead
        // letter is keyed, so it is not written twice).
        let gone = matches!(
            stream.get_raw_message(a.stream_seq).await,
            Err(g) if g.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound
        );
        if !gone {
            return Err(e.into());
        }
    }
    ctx.metrics
        .messages_total
        .with_label_values(&["delivery_limit"])
        .inc();
    tracing::warn!(stream = %a.stream, stream.seq = a.stream_seq, deliveries = a.deliveries, code = %ErrorCode::DeliveryLimitReached, "message reached max_deliver; moved to the dead letters");
    Ok(())
}
