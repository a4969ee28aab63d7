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
use chrono::Utc;
use http_body_util::BodyExt as _;
use mahavishnu::config::ENVELOPE_OVERHEAD_BYTES;
use mahavishnu::webhooks::delivery::{self, headers as h, ResolvedSource, Verified};
use mahavishnu::{topology, ErrorCode};
use serde::Serialize;

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
    Duplicate,
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
    // Reserve memory for the body from the gateway-wide budget (the whole limit when the length
    // is not declared), so many large deliveries at once cannot exhaust memory.
    let kib = u32::try_from(declared.unwrap_or(limit).div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    let _reservation = state
        .webhook_buffer()
        .clone()
        .try_acquire_many_owned(kib)
        .map_err(|_| {
            (
                "overloaded",
                ApiError::new(
                    ErrorCode::Overloaded,
                    "too many webhook bodies in memory; retry shortly",
                ),
            )
        })?;
    // 2. Read, stopping at the limit (chunked bodies declare no length).
    let bytes: Bytes = match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(e) => {
            return Err((
                "bad_body",
                ApiError::new(
                    ErrorCode::MalformedBody,
                    format!("could not read the body: {e}"),
                ),
            ))
        }
    };
    // 3. Verify on the raw bytes.
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let verified = delivery::check(src, get, &bytes, Utc::now()).map_err(|r| {
        tracing::info!(source = %src.name, code = %r.code, outcome = r.outcome, "webhook delivery refused");
        (r.outcome, ApiError::new(r.code, r.message))
    })?;
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
    let sha = delivery::sha256_hex(&bytes);
    // 4. The ledger front.
    let seen = ledger_front(&stores, src, &verified, &sha)
        .await
        .map_err(|e| unavailable("ledger front unavailable", &e))?;
    let now = Utc::now().to_rfc3339();
    let content_type = get(header::CONTENT_TYPE.as_str()).unwrap_or_default();
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
            .header(h::CONTENT_TYPE, content_type)
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
    // 5. Claim-check what does not fit one message.
    let max_payload = usize::try_from(state.settings().nats.stream.max_message_bytes)
        .unwrap_or(0)
        .min(state.nats().server_info().max_payload)
        .saturating_sub(ENVELOPE_OVERHEAD_BYTES);
    let mut msg = base(delivery::msg_id(&src.name, &verified.delivery_id));
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
    // 6. Publish. Always, even when the front says duplicate: an earlier attempt may have
    // failed after the front recorded it. JetStream's dedup or the database ledger absorbs it.
    let ack = publish(state, topology::SUBJECT_WEBHOOK_DELIVER, msg)
        .await
        .map_err(|e| unavailable("publish not acknowledged", &e))?;
    if let (true, Some(object)) = (ack.duplicate, &claim) {
        // JetStream dropped our message as a duplicate: nothing refers to this copy.
        let _ = stores.bodies.delete(object).await;
    }
    Ok(Accepted {
        source: src.name.clone(),
        delivery_id: verified.delivery_id,
        status: "queued",
        duplicate: ack.duplicate || matches!(seen, Seen::Duplicate),
    })
}

/// Records the delivery id (and, for GitHub, the body) in the KV front, atomically, and says
/// whether it is new, a duplicate, or a reuse of the id with another body.
async fn ledger_front(
    stores: &WebhookStores,
    src: &ResolvedSource,
    v: &Verified,
    sha: &str,
) -> Result<Seen, async_nats::Error> {
    let kv = &stores.ledger;
    let id_key = delivery::kv_id_key(&src.name, &v.delivery_id);
    let mut seen = Seen::New;
    match kv
        .create(&id_key, Bytes::copy_from_slice(sha.as_bytes()))
        .await
    {
        Ok(_) => {}
        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => match kv.get(&id_key).await? {
            Some(first) if first.as_ref() == sha.as_bytes() => seen = Seen::Duplicate,
            Some(first) => {
                return Ok(Seen::Tampered {
                    first_sha256: String::from_utf8_lossy(&first).into_owned(),
                })
            }
            // Expired between the two calls: treat as new; the database ledger still guards.
            None => {}
        },
        Err(e) => return Err(e.into()),
    }
    if src.dedup_by_body() {
        let body_key = delivery::kv_body_key(&src.name, sha);
        match kv
            .create(&body_key, Bytes::copy_from_slice(v.delivery_id.as_bytes()))
            .await
        {
            Ok(_) => {}
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => seen = Seen::Duplicate,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(seen)
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
