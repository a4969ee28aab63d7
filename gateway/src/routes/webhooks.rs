//! `POST /v1/webhooks/{source}`: size check while reading, signature verification on the raw
//! bytes, the ledger front (JetStream KV) for duplicates and tampering, claim-check for bodies
//! too large for one message, publish, and `202` only once JetStream acknowledged.

use crate::error::ApiError;
use crate::state::{AppState, WebhookStores};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::CreateErrorKind;
use async_nats::jetstream::message::PublishMessage;
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::BytesMut;
use chrono::Utc;
use futures::StreamExt as _;
use mahavishnu::config::WebhookScheme;
use mahavishnu::config::ENVELOPE_OVERHEAD_BYTES;
use mahavishnu::webhooks::delivery::{self, headers as h, ResolvedSource, Verified};
use mahavishnu::{topology, ErrorCode};
use serde::Serialize;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The `202 Accepted` body.
#[derive(Debug, Serialize)]
pub struct Accepted {
    /// Source name.
    pub source: String,
    /// The sender's delivery id.
    pub delivery_id: String,
    /// Always `queued`.
    pub status: &'static str,
    /// True when this delivery (or, for GitHub, this body) was seen before: it is not
    /// processed again.
    pub duplicate: bool,
}

/// What the ledger front said about a delivery.
enum Seen {
    New,
    Duplicate { published: bool },
    Tampered { first_sha256: String },
}

/// `POST /v1/webhooks/{source}`.
pub async fn receive(
    State(state): State<AppState>,
    source: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let name = source.map(|Path(p)| p).unwrap_or_default();
    let Some(src) = state.webhook_source(&name) else {
        return Err(ApiError::new(
            ErrorCode::WebhookSourceNotFound,
            "no webhook source with this name is configured",
        ));
    };
    let outcome = |o: &str| {
        state
            .metrics()
            .webhook_deliveries_total
            .with_label_values(&[src.name.as_str(), o])
            .inc();
    };
    let result = accept(&state, src, &headers, body).await;
    match &result {
        Ok(a) => outcome(if a.duplicate { "duplicate" } else { "accepted" }),
        Err((o, _)) => outcome(o),
    }
    let accepted = result.map_err(|(_, e)| e)?;
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}

type Failed = (&'static str, ApiError);

async fn accept(
    state: &AppState,
    src: &ResolvedSource,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, Failed> {
    let limit = src.body_limit_bytes;
    let too_large = || {
        (
            "too_large",
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the body is larger than this source's limit of {limit} bytes"),
            ),
        )
    };
    // 1. Size, before reading: a declared length over the limit is refused unread.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let verify = |body: &[u8]| {
        delivery::check(src, get, body, Utc::now()).map_err(|r| {
            tracing::info!(source = %src.name, code = %r.code, outcome = r.outcome, "webhook delivery refused");
            (r.outcome, ApiError::new(r.code, r.message))
        })
    };
    // GitLab's token does not depend on the body: refuse a forged delivery before reading it.
    let early = match src.scheme {
        WebhookScheme::Gitlab => Some(verify(b"")?),
        WebhookScheme::Github | WebhookScheme::Standard => None,
    };
    // 2. Read, stopping at the limit (chunked bodies declare no length), reserving memory from
    // the gateway-wide budget as bytes arrive, so a slow sender holds only what it has sent.
    let (bytes, _reservation) = read_body(body, limit, state.webhook_buffer()).await?;
    // 3. Verify on the raw bytes.
    let mut verified = match early {
        Some(v) => v,
        None => verify(&bytes)?,
    };
    let sha = delivery::sha256_hex(&bytes);
    verified.qualify(&sha);
    state
        .metrics()
        .webhook_verified_total
        .with_label_values(&[src.name.as_str(), verified.secret_id.as_str()])
        .inc();
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        tracing::warn!(source = %src.name, error = %e, "{what}; answering 503");
        (
            "unavailable",
            ApiError::new(
                ErrorCode::BrokerUnavailable,
                "the delivery was not queued: the message broker did not acknowledge it; redeliver it",
            ),
        )
    };
    if !state.nats_connected() {
        return Err(unavailable("NATS is disconnected", &"connection down"));
    }
    let Some(stores) = state.webhook_stores() else {
        return Err(unavailable(
            "webhook stores not set up",
            &"JetStream not ready",
        ));
    };
    // 4. The ledger front.
    let Front { seen, generation } = ledger_front(&stores, src, &verified, &sha)
        .await
        .map_err(|e| unavailable("ledger front unavailable", &e))?;
    let now = Utc::now().to_rfc3339();
    // Bounded: headers must leave the message room for the body (ENVELOPE_OVERHEAD_BYTES).
    let content_type: String = get(header::CONTENT_TYPE.as_str())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(255)
        .collect();
    let base = |msg_id: String| {
        PublishMessage::build()
            .message_id(msg_id)
            .expected_stream(&state.settings().nats.stream.name)
            .header(h::SOURCE, src.name.as_str())
            .header(h::DELIVERY, verified.delivery_id.as_str())
            .header(h::EVENT, verified.event.as_str())
            .header(h::SECRET_ID, verified.secret_id.as_str())
            .header(h::RECEIVED_AT, now.as_str())
            .header(h::BODY_SHA256, sha.as_str())
            .header(h::BODY_SIZE, bytes.len().to_string().as_str())
            .header(h::CONTENT_TYPE, content_type.as_str())
    };
    if let Seen::Tampered { first_sha256 } = seen {
        // Refuse, but only once the attempt is durably queued for the audit log.
        let report = base(format!(
            "whtamper:{}:{}:{sha}",
            src.name, verified.delivery_id
        ))
        .header(h::FIRST_SHA256, first_sha256.as_str());
        publish(state, topology::SUBJECT_WEBHOOK_TAMPERED, report)
            .await
            .map_err(|e| unavailable("tamper report not acknowledged", &e))?;
        tracing::warn!(source = %src.name, "webhook delivery id reused with a different body; refused (MHV-301) and audited");
        return Err((
            "tampered",
            ApiError::new(
                ErrorCode::WebhookReplay,
                "this delivery id was already received with a different body",
            ),
        ));
    }
    if let Seen::Duplicate { published: true } = seen {
        // A copy is already in JetStream: processed once, nothing more to store or publish.
        return Ok(Accepted {
            source: src.name.clone(),
            delivery_id: verified.delivery_id,
            status: "queued",
            duplicate: true,
        });
    }
    // 5. Claim-check what does not fit one message.
    let max_payload = usize::try_from(state.settings().nats.stream.max_message_bytes)
        .unwrap_or(0)
        .min(state.nats().server_info().max_payload)
        .saturating_sub(ENVELOPE_OVERHEAD_BYTES);
    let mut msg = base(delivery::msg_id(
        &src.name,
        &verified.delivery_id,
        generation,
    ));
    let claim = if bytes.len() > max_payload {
        let object = format!("{}/{}", src.name, uuid::Uuid::now_v7());
        stores
            .bodies
            .put(object.as_str(), &mut bytes.as_ref())
            .await
            .map_err(|e| unavailable("claim-check put failed", &e))?;
        state
            .metrics()
            .webhook_claim_checked_total
            .with_label_values(&[src.name.as_str()])
            .inc();
        msg = msg.header(h::CLAIM_CHECK, object.as_str());
        Some(object)
    } else {
        msg = msg.payload(bytes.clone());
        None
    };
    // 6. Publish, also for a duplicate whose first copy is not known to be in JetStream (its
    // publish may have failed): JetStream's window or the database ledger absorbs a second copy.
    let ack = publish(state, topology::SUBJECT_WEBHOOK_DELIVER, msg)
        .await
        .map_err(|e| unavailable("publish not acknowledged", &e))?;
    if let (true, Some(object)) = (ack.duplicate, &claim) {
        // JetStream dropped our message as a duplicate: nothing refers to this copy.
        let _ = stores.bodies.delete(object).await;
    }
    // Later copies need not be published. Off the answer's path, and best effort: without the
    // mark they are published and deduplicated downstream.
    // Only over the revision we know, so a mark never lands on another body's key.
    if let Some(revision) = generation {
        let id_key = delivery::kv_id_key(&src.name, &verified.delivery_id);
        let (ledger, mark) = (stores.ledger.clone(), format!("{sha}{PUBLISHED}"));
        tokio::spawn(async move {
            if let Err(e) = ledger.update(&id_key, mark.into(), revision).await {
                tracing::debug!(error = %e, "could not mark the delivery published");
            }
        });
    }
    Ok(Accepted {
        source: src.name.clone(),
        delivery_id: verified.delivery_id,
        status: "queued",
        duplicate: ack.duplicate || matches!(seen, Seen::Duplicate { .. }),
    })
}

/// Marks the KV value of a delivery id whose message JetStream acknowledged.
const PUBLISHED: &str = " published";

/// What the ledger front knows of a delivery, and the revision of its id key (its
/// generation: a delivery forgotten after a dead letter and received again gets a new one).
struct Front {
    seen: Seen,
    generation: Option<u64>,
}

/// Checks the delivery against the KV front and records it there, atomically. Values:
/// `{source}.id.{h(id)}` → `{body sha}`, then `{body sha} published` once a publish was
/// acknowledged; `{source}.body.{sha}` → the first delivery id with that body (GitHub).
async fn ledger_front(
    stores: &WebhookStores,
    src: &ResolvedSource,
    v: &Verified,
    sha: &str,
) -> Result<Front, async_nats::Error> {
    use async_nats::jetstream::kv::Operation;
    let kv = &stores.ledger;
    let id_key = delivery::kv_id_key(&src.name, &v.delivery_id);
    let read = |key: String| async move {
        Ok::<_, async_nats::Error>(
            kv.entry(key)
                .await?
                .filter(|e| e.operation == Operation::Put),
        )
    };
    // The id first: a reused id with another body is tampering, whatever the body.
    let mut existing = read(id_key.clone()).await?;
    if existing.is_none() {
        if src.dedup_by_body() {
            // The same signed body under another delivery id is a replay: nothing to store or
            // publish when the first copy is in JetStream. Read-only, so replays under random
            // ids write nothing.
            let body_key = delivery::kv_body_key(&src.name, sha);
            if let Some(first) = kv.get(&body_key).await? {
                let first = String::from_utf8_lossy(&first).into_owned();
                let first_value = kv.get(delivery::kv_id_key(&src.name, &first)).await?;
                if first != v.delivery_id
                    && first_value.is_some_and(|f| f.ends_with(PUBLISHED.as_bytes()))
                {
                    return Ok(Front {
                        seen: Seen::Duplicate { published: true },
                        generation: None,
                    });
                }
            }
        }
        match kv
            .create(&id_key, Bytes::copy_from_slice(sha.as_bytes()))
            .await
        {
            Ok(revision) => {
                if src.dedup_by_body() {
                    let body_key = delivery::kv_body_key(&src.name, sha);
                    match kv
                        .create(&body_key, Bytes::copy_from_slice(v.delivery_id.as_bytes()))
                        .await
                    {
                        // Another id has this body but its copy is not known to be published:
                        // this copy goes out too, and the database ledger records the replay.
                        Ok(_) => {}
                        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                return Ok(Front {
                    seen: Seen::New,
                    generation: Some(revision),
                });
            }
            // A concurrent copy created it first.
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                existing = read(id_key).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let Some(entry) = existing else {
        // Expired between two calls: new as far as the front knows; the database ledger guards.
        return Ok(Front {
            seen: Seen::New,
            generation: None,
        });
    };
    let value = String::from_utf8_lossy(&entry.value);
    let (first_sha, published) = match value.strip_suffix(PUBLISHED) {
        Some(first) => (first.to_owned(), true),
        None => (value.into_owned(), false),
    };
    if first_sha != sha {
        return Ok(Front {
            seen: Seen::Tampered {
                first_sha256: first_sha,
            },
            generation: None,
        });
    }
    Ok(Front {
        seen: Seen::Duplicate { published },
        generation: Some(entry.revision),
    })
}

/// Reads the body up to `limit` bytes, reserving it from the budget (KiB permits) as it comes.
async fn read_body(
    body: Body,
    limit: usize,
    budget: &Arc<Semaphore>,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), Failed> {
    /// Reservations grow by at least this much, so a body is not a semaphore call per chunk.
    const STEP_KIB: u32 = 64;
    let limit_kib = u32::try_from(limit.div_ceil(1024)).unwrap_or(u32::MAX);
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    let mut permit: Option<OwnedSemaphorePermit> = None;
    let mut reserved_kib: u32 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            (
                "bad_body",
                ApiError::new(
                    ErrorCode::MalformedBody,
                    format!("could not read the body: {e}"),
                ),
            )
        })?;
        let len = buf.len() + chunk.len();
        if len > limit {
            return Err((
                "too_large",
                ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("the body is larger than this source's limit of {limit} bytes"),
                ),
            ));
        }
        let need = u32::try_from(len.div_ceil(1024)).unwrap_or(u32::MAX);
        if need > reserved_kib {
            let more = (need - reserved_kib).max(STEP_KIB).min(
                limit_kib
                    .saturating_sub(reserved_kib)
                    .max(need - reserved_kib),
            );
            let p = budget.clone().try_acquire_many_owned(more).map_err(|_| {
                (
                    "overloaded",
                    ApiError::new(
                        ErrorCode::Overloaded,
                        "too many webhook bodies in memory; retry shortly",
                    ),
                )
            })?;
            match &mut permit {
                Some(held) => held.merge(p),
                None => permit = Some(p),
            }
            reserved_kib += more;
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf.freeze(), permit))
}

async fn publish(
    state: &AppState,
    subject: &'static str,
    msg: PublishMessage,
) -> Result<async_nats::jetstream::publish::PublishAck, async_nats::Error> {
    let ack = state
        .js()
        .send_publish(subject, msg)
        .await
        .map_err(|e| -> async_nats::Error {
            if e.kind() == PublishErrorKind::MaxPayloadExceeded {
                "message larger than the broker accepts".into()
            } else {
                e.into()
            }
        })?;
    Ok(ack.await?)
}
