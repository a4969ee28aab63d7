//! Webhook deliveries: the ledger, routing into tasks, tamper reports and forced redeliveries.
//!
//! Per delivery, in one transaction: the ledger row `webhook_deliveries` (unique on
//! `(source, delivery_id)`, and for GitHub on `(source, body_sha256)`) with the verbatim body,
//! then — only if that row is new and a rule matched — the task through the same `inbox` path as
//! every other task, and an audit row. A repeat finds the row taken: same body → duplicate,
//! different body → tampering, same body under a new GitHub delivery id → replay. Each is audited
//! and acked without a task. Ack only after commit; the claim-checked body (if any) is deleted
//! after the ack.

use crate::persist::{self, Item, ItemKind, Outcome, Raw};
use crate::Ctx;
use async_nats::jetstream::{self, AckKind};
use chrono::{DateTime, Utc};
use mahavishnu::config::WebhookScheme;
use mahavishnu::webhooks::delivery::{self, headers as h, RedeliverRequest};
use mahavishnu::webhooks::route::{self, Verdict};
use mahavishnu::{db, envelope, task, topology, ErrorCode};
use serde_json::json;
use sqlx::types::Json;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt as _;
use uuid::Uuid;

/// True for the subjects this module handles.
pub fn is_webhook_subject(subject: &str) -> bool {
    subject.starts_with("mhv.webhooks.")
}

/// Handles webhook messages one by one (each in its own transaction), with in-progress acks
/// while they run.
pub async fn handle_messages(ctx: &Arc<Ctx>, msgs: Vec<jetstream::Message>) {
    let msgs = Arc::new(msgs);
    let heartbeat = crate::ingest::heartbeat(ctx, Arc::clone(&msgs));
    let n = msgs.len();
    let mut results: Vec<Option<Result<Done, Failure>>> = (0..n).map(|_| None).collect();
    let mut bodies: Vec<Option<bytes::Bytes>> = vec![None; n];
    let mut ready: Vec<(usize, Prepared)> = Vec::new();
    // Claim-checked bodies one pull may hold in memory; the first is always fetched, so a pull
    // of large bodies still makes progress one at a time.
    let mut budget_left = BATCH_BODY_BUDGET;
    for (i, msg) in msgs.iter().enumerate() {
        results[i] = match msg.subject.as_str() {
            topology::SUBJECT_WEBHOOK_DELIVER => {
                match prepare(ctx, msg, &mut bodies[i], &mut budget_left).await {
                    Ok(Ok(p)) => {
                        ready.push((i, p));
                        None
                    }
                    Ok(Err(done)) => Some(Ok(done)),
                    Err(f) => Some(Err(f)),
                }
            }
            topology::SUBJECT_WEBHOOK_TAMPERED => Some(tampered(ctx, msg).await),
            topology::SUBJECT_WEBHOOK_REDELIVER => Some(redeliver(ctx, msg).await),
            _ => Some(Err(Failure::Poison(
                ErrorCode::Validation,
                "unknown webhook subject".into(),
            ))),
        };
    }
    for (i, r) in record_deliveries(ctx, ready).await {
        results[i] = Some(r);
    }
    for ((msg, result), body) in msgs.iter().zip(results).zip(bodies) {
        let deliveries = msg.info().map(|i| i.delivered).unwrap_or(1);
        let result = match result {
            None => Err(Failure::Transient("not handled".into())),
            Some(Err(Failure::Bounded(code, why))) if deliveries >= BOUNDED_DELIVERIES => Err(
                Failure::Poison(code, format!("{why} (after {deliveries} deliveries)")),
            ),
            Some(Err(Failure::Bounded(_, why))) => Err(Failure::Transient(why)),
            Some(other) => other,
        };
        match result {
            Ok(done) => {
                if let Some((id, task)) = &done.exec {
                    if !crate::ingest::request_execution(ctx, *id, task).await {
                        crate::ingest::nak(ctx, msg).await;
                        continue;
                    }
                }
                if let Err(e) = msg.ack_with(AckKind::Ack).await {
                    tracing::warn!(error = %e, "ack failed after commit; the ledger absorbs the redelivery");
                } else if let Some(name) = done.delete_object {
                    delete_object(ctx, &name).await;
                }
            }
            Err(Failure::Transient(e)) => {
                tracing::warn!(error = %e, subject = %msg.subject, "webhook message failed for a passing reason; redelivering later");
                crate::ingest::nak(ctx, msg).await;
            }
            Err(Failure::Poison(code, reason)) => poison(ctx, msg, code, reason, body).await,
            Err(Failure::Later) => {
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_millis(100))))
                    .await;
            }
            Err(Failure::Bounded(..)) => unreachable_bounded(ctx, msg).await,
        }
    }
    heartbeat.abort();
}

/// Writes every prepared delivery of a pull in one transaction (one commit, and so one WAL
/// flush, for all of them), in key order so that concurrent batches take their row locks in
/// the same order. If the batch fails for a reason a retry cannot fix, each delivery is tried
/// alone, so one bad delivery cannot hold up the others.
async fn record_deliveries(
    ctx: &Arc<Ctx>,
    mut ready: Vec<(usize, Prepared)>,
) -> Vec<(usize, Result<Done, Failure>)> {
    if ready.is_empty() {
        return Vec::new();
    }
    ready.sort_by(|a, b| {
        (&a.1.m.source, &a.1.m.delivery_id).cmp(&(&b.1.m.source, &b.1.m.delivery_id))
    });
    let ready = Arc::new(ready);
    let started = std::time::Instant::now();
    // A delivery that failed before (a timeout on a huge body, a deadlock) is written alone, so
    // it cannot keep failing the deliveries batched with it.
    let together = ready.len() == 1 || ready.iter().all(|(_, p)| p.deliveries <= 1);
    let result = if together {
        Some(record_in_one(ctx, Arc::clone(&ready)).await)
    } else {
        None
    };
    ctx.metrics
        .transaction_seconds
        .observe(started.elapsed().as_secs_f64());
    match result {
        Some(Ok(labels)) => ready
            .iter()
            .zip(labels)
            .map(|((i, p), label)| (*i, Ok(settled(ctx, p, label))))
            .collect(),
        // A first failure for a passing reason (an outage): everything is tried again later.
        Some(Err(e)) if ready.len() == 1 || e.is_transient() => {
            let why = e.to_string();
            ready
                .iter()
                .map(|(i, _)| (*i, Err(failure(e.is_transient(), &why))))
                .collect()
        }
        other => {
            if let Some(Err(e)) = other {
                tracing::warn!(error = %e, deliveries = ready.len(), "webhook batch failed; writing one by one");
            }
            let mut out = Vec::with_capacity(ready.len());
            let mut outage: Option<String> = None;
            for (i, p) in ready.iter() {
                // Once the database fails for a passing reason, do not try the rest one by one.
                if let Some(why) = &outage {
                    out.push((*i, Err(Failure::Transient(why.clone()))));
                    continue;
                }
                let one = Arc::new(vec![(*i, p.clone())]);
                let r = match record_in_one(ctx, one).await {
                    Ok(labels) => Ok(settled(ctx, p, labels[0])),
                    Err(e) if e.is_transient() => {
                        outage = Some(e.to_string());
                        Err(Failure::Transient(e.to_string()))
                    }
                    Err(e) => Err(failure(false, &e.to_string())),
                };
                out.push((*i, r));
            }
            out
        }
    }
}

fn failure(transient: bool, why: &str) -> Failure {
    if transient {
        Failure::Transient(why.to_owned())
    } else {
        Failure::Poison(
            ErrorCode::TaskCreationFailed,
            format!("the database refused the delivery: {why}"),
        )
    }
}

fn settled(ctx: &Ctx, p: &Prepared, label: &'static str) -> Done {
    let source = source_label(ctx, &p.m.source);
    if label == "tampered" {
        tracing::warn!(source = %source, "webhook delivery id reused with a different body; refused and audited");
    }
    ctx.metrics
        .webhook_deliveries_total
        .with_label_values(&[source.as_str(), label])
        .inc();
    // Also for a duplicate of the same delivery: its first copy may have committed and died
    // before its execution request was published (a second request is harmless).
    let exec = match (&p.routed, label) {
        (Routed::Task { task, .. }, "task_created" | "duplicate") => Some((
            envelope::task_id_for(&delivery::task_key(&p.m.source, &p.m.delivery_id)),
            task.clone(),
        )),
        _ => None,
    };
    Done {
        delete_object: p.m.claim_check.clone(),
        exec,
    }
}

async fn record_in_one(
    ctx: &Ctx,
    ready: Arc<Vec<(usize, Prepared)>>,
) -> Result<Vec<&'static str>, db::TxError> {
    let pool = ctx.pool.clone();
    db::detached(async move {
        let mut tx = pool.begin().await?;
        let mut labels = Vec::with_capacity(ready.len());
        for (_, p) in ready.iter() {
            labels.push(record(&mut tx, p).await?);
        }
        tx.commit().await?;
        Ok(labels)
    })
    .await
}

/// `Bounded` failures were mapped above; NAK if one ever gets here rather than panic.
async fn unreachable_bounded(ctx: &Ctx, msg: &jetstream::Message) {
    crate::ingest::nak(ctx, msg).await;
}

/// What a handled message leaves to do after its ack.
#[derive(Default)]
struct Done {
    delete_object: Option<String>,
    /// A task to request the execution of before the ack.
    exec: Option<(Uuid, task::NewTask)>,
}

enum Failure {
    /// Retried, however long it takes (a database or broker outage).
    Transient(String),
    /// Retried up to [`BOUNDED_DELIVERIES`], then dead-lettered with the code: causes an
    /// operator must fix (a source this worker does not know, an unreadable stored body).
    Bounded(ErrorCode, String),
    /// Dead-lettered now, with the body if it was fetched from the object store.
    Poison(ErrorCode, String),
    /// Not now: handed back at once for another pull (this one's body budget is spent).
    Later,
}

/// Deliveries after which a [`Failure::Bounded`] message is dead-lettered.
const BOUNDED_DELIVERIES: i64 = 10;

/// Bytes of claim-checked bodies one pull fetches; later ones are handed back for another pull.
const BATCH_BODY_BUDGET: usize = 64 * 1024 * 1024;

impl From<db::TxError> for Failure {
    fn from(e: db::TxError) -> Self {
        if e.is_transient() {
            Self::Transient(e.to_string())
        } else {
            Self::Poison(
                ErrorCode::TaskCreationFailed,
                format!("the database refused the delivery: {e}"),
            )
        }
    }
}

#[derive(Clone)]
struct Meta {
    source: String,
    delivery_id: String,
    header_event: String,
    secret_id: String,
    received_at: DateTime<Utc>,
    body_sha256: [u8; 32],
    content_type: String,
    claim_check: Option<String>,
}

fn header(msg: &jetstream::Message, name: &str) -> Option<String> {
    msg.headers
        .as_ref()
        .and_then(|hm| hm.get(name))
        .map(|v| v.as_str().to_owned())
}

fn meta(msg: &jetstream::Message) -> Result<Meta, Failure> {
    let need = |name: &'static str| {
        header(msg, name).filter(|v| !v.is_empty()).ok_or_else(|| {
            Failure::Poison(ErrorCode::Validation, format!("header {name} is missing"))
        })
    };
    let source = need(h::SOURCE)?;
    if !task::validate::is_valid_repository(&source, 64) {
        return Err(Failure::Poison(
            ErrorCode::Validation,
            "bad source name".into(),
        ));
    }
    let delivery_id = need(h::DELIVERY)?;
    if delivery_id.len() > delivery::LEDGER_ID_MAX {
        return Err(Failure::Poison(
            ErrorCode::Validation,
            "delivery id too long".into(),
        ));
    }
    let mut body_sha256 = [0u8; 32];
    hex::decode_to_slice(need(h::BODY_SHA256)?, &mut body_sha256)
        .map_err(|_| Failure::Poison(ErrorCode::Validation, "bad body hash header".into()))?;
    let received_at = DateTime::parse_from_rfc3339(&need(h::RECEIVED_AT)?)
        .map_err(|_| Failure::Poison(ErrorCode::Validation, "bad received-at header".into()))?
        .with_timezone(&Utc);
    let header_event = clean_event(&header(msg, h::EVENT).unwrap_or_default());
    Ok(Meta {
        source,
        delivery_id,
        header_event,
        secret_id: header(msg, h::SECRET_ID).unwrap_or_default(),
        received_at,
        body_sha256,
        content_type: header(msg, h::CONTENT_TYPE)
            .unwrap_or_default()
            .replace('\0', ""),
        claim_check: header(msg, h::CLAIM_CHECK).filter(|v| !v.is_empty()),
    })
}

/// An event name fit for a text column and a terminal: no control characters (NUL included),
/// at most [`delivery::EVENT_MAX`] characters.
fn clean_event(raw: &str) -> String {
    raw.chars()
        .filter(|c| !c.is_control())
        .take(delivery::EVENT_MAX)
        .collect()
}

/// The routing rules of a source as this worker is configured (none for an unknown source).
fn rules_of<'a>(ctx: &'a Ctx, source: &str) -> &'a [mahavishnu::config::WebhookRule] {
    ctx.settings
        .webhooks
        .sources
        .get(source)
        .map(|s| s.rules.as_slice())
        .unwrap_or_default()
}

/// The scheme of a source as this worker is configured; `None` when it does not know it.
fn scheme_of(ctx: &Ctx, source: &str) -> Option<WebhookScheme> {
    ctx.settings.webhooks.sources.get(source).map(|s| s.scheme)
}

/// A delivery ready for its transaction: decoded, its body fetched and checked, routed.
#[derive(Clone)]
struct Prepared {
    m: Meta,
    scheme: WebhookScheme,
    body: bytes::Bytes,
    event: String,
    routed: Routed,
    attempt_key: String,
    stream_seq: u64,
    subject: String,
    deliveries: i64,
}

/// Everything about a delivery that needs no transaction. `Ok(Err(done))`: nothing to write
/// (a claim-checked copy of a delivery already committed).
async fn prepare(
    ctx: &Arc<Ctx>,
    msg: &jetstream::Message,
    fetched: &mut Option<bytes::Bytes>,
    budget_left: &mut usize,
) -> Result<Result<Prepared, Done>, Failure> {
    let m = meta(msg)?;
    // The body first: a delivery dead-lettered for any reason keeps it.
    let body = match &m.claim_check {
        None => msg.payload.clone(),
        Some(name) => {
            if *budget_left == 0 {
                return Err(Failure::Later);
            }
            match fetch_object(ctx, name).await? {
                Some(b) => {
                    *budget_left = budget_left.saturating_sub(b.len());
                    // Kept for a dead letter: the message itself carries no body.
                    *fetched = Some(b.clone());
                    b
                }
                None => return missing_body(ctx, &m).await.map(Err),
            }
        }
    };
    let Some(scheme) = scheme_of(ctx, &m.source) else {
        // A rolling deploy can briefly run a worker that does not know a new source yet; a
        // source removed while deliveries were queued must not loop forever.
        return Err(Failure::Bounded(
            ErrorCode::WebhookSourceNotFound,
            format!("source {:?} is not configured on this worker", m.source),
        ));
    };
    if sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&body)).as_slice()
        != m.body_sha256
    {
        return Err(Failure::Poison(
            ErrorCode::Validation,
            "the body does not match its hash header".into(),
        ));
    }
    let rules = rules_of(ctx, &m.source);
    let (event, routed) = decide(
        scheme,
        &m.header_event,
        &body,
        rules,
        &ctx.limits,
        m.received_at,
        &ctx.settings.repositories,
    );
    Ok(Ok(Prepared {
        attempt_key: attempt_key(msg),
        stream_seq: msg.info().map(|i| i.stream_sequence).unwrap_or(0),
        deliveries: msg.info().map(|i| i.delivered).unwrap_or(1),
        subject: msg.subject.to_string(),
        m,
        scheme,
        body,
        event,
        routed,
    }))
}

/// One delivery's writes inside the caller's transaction; returns the metric label.
async fn record(tx: &mut sqlx::PgConnection, p: &Prepared) -> Result<&'static str, sqlx::Error> {
    let Prepared {
        m,
        scheme,
        body,
        event,
        routed,
        attempt_key,
        stream_seq,
        subject,
        deliveries: _,
    } = p;
    let (scheme, stream_seq) = (*scheme, *stream_seq);
    let key = delivery::task_key(&m.source, &m.delivery_id);
    let claim = &m.claim_check;
    let raw = Raw {
        subject: subject.clone(),
        headers: json!({"source": m.source, "delivery_id": m.delivery_id}),
        payload: bytes::Bytes::new(),
    };
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO webhook_deliveries (source, delivery_id, scheme, event, body_sha256, dedup_by_body,
                                         secret_id, content_type, body, verdict, rule, reason, received_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         ON CONFLICT DO NOTHING
         RETURNING id",
    )
    .bind(&m.source)
    .bind(&m.delivery_id)
    .bind(scheme.as_str())
    .bind(event)
    .bind(m.body_sha256.as_slice())
    .bind(delivery::dedup_by_body(scheme))
    .bind(&m.secret_id)
    .bind(&m.content_type)
    .bind(body.as_ref())
    .bind(routed.verdict())
    .bind(routed.rule())
    .bind(routed.reason())
    .bind(m.received_at)
    .fetch_optional(&mut *tx)
    .await?;
    let label;
    if let Some(row) = inserted {
        let (verdict, task_id) =
            make_task(&mut *tx, routed, &key, &m.source, raw, stream_seq).await?;
        if verdict != routed.verdict() || task_id.is_some() {
            // The task's own guard had the last word (an inbox key reused with another
            // task after the ledger row was pruned is refused as MHV-106).
            let reason = (verdict == "invalid" && routed.verdict() != "invalid").then(|| {
                format!("{key} already made a different task (MHV-106); the first stands")
            });
            sqlx::query(
                "UPDATE webhook_deliveries
                 SET verdict = $1, reason = COALESCE($2, reason),
                     task_id = (SELECT id FROM tasks WHERE id = $3)
                 WHERE id = $4",
            )
            .bind(verdict)
            .bind(reason)
            .bind(task_id)
            .bind(row)
            .execute(&mut *tx)
            .await?;
        }
        label = verdict;
        audit(
            &mut *tx,
            &format!("recv:{}:{}", m.source, m.delivery_id),
            &m.source,
            &m.delivery_id,
            "webhook_received",
            &m.body_sha256,
            json!({"verdict": verdict, "rule": routed.rule(), "reason": routed.reason(),
                   "task_id": task_id, "event": event, "secret_id": m.secret_id,
                   "size": body.len(), "claim_checked": claim.is_some()}),
        )
        .await?;
    } else {
        // Which earlier delivery holds the id (or, for GitHub, the body)?
        let first: Option<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT delivery_id, body_sha256 FROM webhook_deliveries
             WHERE source = $1 AND (delivery_id = $2 OR (dedup_by_body AND body_sha256 = $3))
             ORDER BY (delivery_id = $2) DESC LIMIT 1",
        )
        .bind(&m.source)
        .bind(&m.delivery_id)
        .bind(m.body_sha256.as_slice())
        .fetch_optional(&mut *tx)
        .await?;
        let Some((first_id, first_sha)) = first else {
            // Pruned between our insert and this read: try again later.
            return Err(sqlx::Error::RowNotFound);
        };
        let (event_name, key) = if first_id != m.delivery_id {
            ("webhook_replayed", attempt_key.clone())
        } else if first_sha == m.body_sha256 {
            ("webhook_duplicate", attempt_key.clone())
        } else {
            (
                "webhook_tampered",
                tamper_key(&m.source, &m.delivery_id, &hex::encode(m.body_sha256)),
            )
        };
        label = match event_name {
            "webhook_replayed" => "replayed",
            "webhook_duplicate" => "duplicate",
            _ => "tampered",
        };
        audit(
            &mut *tx,
            &key,
            &m.source,
            &m.delivery_id,
            event_name,
            &m.body_sha256,
            json!({"first_delivery_id": first_id, "first_body_sha256": hex::encode(&first_sha),
                   "secret_id": m.secret_id, "size": body.len(), "detected_by": "worker"}),
        )
        .await?;
    }
    Ok(label)
}

/// Routing outcome, before the transaction.
#[derive(Clone)]
enum Routed {
    Task {
        rule: String,
        task: task::NewTask,
    },
    NoMatch,
    Invalid {
        rule: Option<String>,
        reason: String,
    },
}

impl Routed {
    fn verdict(&self) -> &'static str {
        match self {
            Self::Task { .. } => "task_created",
            Self::NoMatch => "no_match",
            Self::Invalid { .. } => "invalid",
        }
    }
    fn rule(&self) -> Option<&str> {
        match self {
            Self::Task { rule, .. } => Some(rule),
            Self::Invalid { rule, .. } => rule.as_deref(),
            Self::NoMatch => None,
        }
    }
    fn reason(&self) -> Option<&str> {
        match self {
            Self::Invalid { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// Parses, routes and validates. Pure apart from the clock passed in.
fn decide(
    scheme: WebhookScheme,
    header_event: &str,
    body: &[u8],
    rules: &[mahavishnu::config::WebhookRule],
    limits: &task::Limits,
    received_at: DateTime<Utc>,
    registry: &std::collections::BTreeMap<String, mahavishnu::registry::Repository>,
) -> (String, Routed) {
    let payload: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return (
                header_event.to_owned(),
                Routed::Invalid {
                    rule: None,
                    reason: format!("the body is not JSON: {e}"),
                },
            )
        }
    };
    let event = clean_event(&route::event_of(scheme, header_event, &payload));
    let routed = match route::route(scheme, &event, &payload, rules) {
        Verdict::NoMatch => Routed::NoMatch,
        Verdict::Invalid { rule, reason } => Routed::Invalid {
            rule: Some(rule),
            reason,
        },
        Verdict::Task { rule, request } => match task::validate(&request, limits, received_at) {
            Ok(task) => match mahavishnu::registry::plan_for(registry, &task) {
                Ok(_) => Routed::Task { rule, task },
                Err(e) => Routed::Invalid {
                    rule: Some(rule),
                    reason: format!("{} ({}): {}", e.field, e.code, e.message),
                },
            },
            Err(fields) => Routed::Invalid {
                rule: Some(rule),
                reason: fields
                    .iter()
                    .map(|f| format!("{}: {}", f.field, f.problem))
                    .collect::<Vec<_>>()
                    .join("; "),
            },
        },
    };
    (event, routed)
}

/// Writes the routed task (if any) through the inbox. Returns the verdict label and task id.
async fn make_task(
    tx: &mut sqlx::PgConnection,
    routed: &Routed,
    key: &str,
    source: &str,
    raw: Raw,
    stream_seq: u64,
) -> Result<(&'static str, Option<Uuid>), sqlx::Error> {
    let Routed::Task { task, .. } = routed else {
        return Ok((routed.verdict(), None));
    };
    let task_id = envelope::task_id_for(key);
    let item = Item {
        key: key.to_owned(),
        stream_seq,
        deliveries: 1,
        kind: ItemKind::Task {
            task_id,
            fingerprint: envelope::fingerprint(task),
            task: task.clone(),
            principal: format!("webhook:{source}"),
            raw,
        },
    };
    let outcome = persist::persist_in(tx, &[item]).await?;
    Ok(match outcome.first() {
        // Duplicate: the inbox (which retention never prunes) already made this task.
        Some(Outcome::Persisted | Outcome::Duplicate) => ("task_created", Some(task_id)),
        _ => ("invalid", None),
    })
}

#[allow(clippy::too_many_arguments)]
async fn audit(
    tx: &mut sqlx::PgConnection,
    event_key: &str,
    source: &str,
    delivery_id: &str,
    event: &str,
    body_sha256: &[u8],
    details: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO webhook_audit_log (event_key, source, delivery_id, event, actor, body_sha256, details)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_key) DO NOTHING",
    )
    .bind(event_key)
    .bind(source)
    .bind(delivery_id)
    .bind(event)
    .bind(format!("webhook:{source}"))
    .bind(body_sha256)
    .bind(Json(details))
    .execute(tx)
    .await?;
    Ok(())
}

/// Audit key of a tampering attempt: one row per (delivery id, offered body), whoever saw it.
pub fn tamper_key(source: &str, delivery_id: &str, offered_sha256_hex: &str) -> String {
    format!("tamper:{source}:{delivery_id}:{offered_sha256_hex}")
}

/// Identity of one message (stream, sequence, store time): a redelivery audits once.
fn attempt_key(msg: &jetstream::Message) -> String {
    match msg.info() {
        Ok(i) => envelope::producer_key(None, (i.stream, i.stream_sequence), i.published),
        Err(_) => format!("attempt:{}", Uuid::now_v7()),
    }
}

fn source_label(ctx: &Ctx, source: &str) -> String {
    if ctx.settings.webhooks.sources.contains_key(source) {
        source.to_owned()
    } else {
        "_other".to_owned()
    }
}

/// A claim-checked body that is gone. If the ledger already has the delivery, this message is a
/// redelivery of one already committed (the body was deleted after that commit): a duplicate.
/// Otherwise the body expired before any worker saw it: dead-letter (MHV-014).
async fn missing_body(ctx: &Arc<Ctx>, m: &Meta) -> Result<Done, Failure> {
    let pool = ctx.pool.clone();
    let (source, id, sha) = (m.source.clone(), m.delivery_id.clone(), m.body_sha256);
    // The ledger has this id, or (GitHub) this body, or this copy was audited as tampering:
    // a copy committed earlier whose body was deleted after that commit.
    let tamper = tamper_key(&source, &id, &hex::encode(sha));
    let known: bool = db::detached(async move {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM webhook_deliveries
                            WHERE source = $1 AND (delivery_id = $2 OR (dedup_by_body AND body_sha256 = $3)))
                 OR EXISTS (SELECT 1 FROM webhook_audit_log WHERE event_key = $4)",
        )
        .bind(source)
        .bind(id)
        .bind(sha.as_slice())
        .bind(tamper)
        .fetch_one(&pool)
        .await
    })
    .await?;
    if known {
        ctx.metrics
            .webhook_deliveries_total
            .with_label_values(&[source_label(ctx, &m.source).as_str(), "duplicate"])
            .inc();
        return Ok(Done::default());
    }
    Err(Failure::Poison(
        ErrorCode::StoredBodyMissing,
        format!(
            "claim-checked body {:?} is no longer in the object store",
            m.claim_check
        ),
    ))
}

async fn bodies(ctx: &Ctx) -> Result<&jetstream::object_store::ObjectStore, Failure> {
    ctx.webhook_bodies
        .0
        // Open only: the gateway creates and configures the buckets. A worker without the
        // rights to change them (or with other settings) must not rewrite them.
        .get_or_try_init(|| ctx.js.get_object_store(&ctx.settings.webhooks.body_bucket))
        .await
        .map_err(|e| {
            Failure::Bounded(
                ErrorCode::StoredBodyMissing,
                format!(
                    "cannot open object store {}: {e}",
                    ctx.settings.webhooks.body_bucket
                ),
            )
        })
}

async fn fetch_object(ctx: &Ctx, name: &str) -> Result<Option<bytes::Bytes>, Failure> {
    use jetstream::object_store::GetErrorKind;
    let store = bodies(ctx).await?;
    let mut obj = match store.get(name).await {
        Ok(o) => o,
        Err(e) if e.kind() == GetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Failure::Transient(e.to_string())),
    };
    let mut buf = Vec::with_capacity(obj.info.size);
    // A broken connection heals; a corrupt object (digest mismatch) does not: bounded.
    obj.read_to_end(&mut buf).await.map_err(|e| {
        Failure::Bounded(
            ErrorCode::StoredBodyMissing,
            format!("reading claim-checked body {name:?}: {e}"),
        )
    })?;
    Ok(Some(buf.into()))
}

async fn delete_object(ctx: &Ctx, name: &str) {
    if let Ok(store) = bodies(ctx).await {
        if let Err(e) = store.delete(name).await {
            // The bucket's max age removes it eventually.
            tracing::debug!(error = %e, "claim-checked body not deleted");
        }
    }
}

/// The gateway refused a delivery whose id the ledger front holds with another body.
async fn tampered(ctx: &Arc<Ctx>, msg: &jetstream::Message) -> Result<Done, Failure> {
    let m = meta(msg)?;
    let first = header(msg, h::FIRST_SHA256).unwrap_or_default();
    let pool = ctx.pool.clone();
    let key = tamper_key(&m.source, &m.delivery_id, &hex::encode(m.body_sha256));
    let source = m.source.clone();
    db::detached(async move {
        let mut tx = pool.begin().await?;
        audit(
            &mut tx,
            &key,
            &m.source,
            &m.delivery_id,
            "webhook_tampered",
            &m.body_sha256,
            json!({"first_body_sha256": first, "secret_id": m.secret_id,
                   "received_at": m.received_at, "detected_by": "gateway"}),
        )
        .await?;
        tx.commit().await
    })
    .await?;
    ctx.metrics
        .webhook_deliveries_total
        .with_label_values(&[source_label(ctx, &source).as_str(), "tampered"])
        .inc();
    Ok(Done::default())
}

/// An operator-forced redelivery: route the stored body again with the current rules, bypassing
/// the duplicate check. The task key derives from the request id, so handling the same request
/// twice still makes one task.
async fn redeliver(ctx: &Arc<Ctx>, msg: &jetstream::Message) -> Result<Done, Failure> {
    let req: RedeliverRequest = serde_json::from_slice(&msg.payload).map_err(|e| {
        Failure::Poison(
            ErrorCode::MalformedBody,
            format!("bad redelivery request: {e}"),
        )
    })?;
    let rules = rules_of(ctx, &req.source).to_vec();
    let limits = ctx.limits;
    let registry = ctx.settings.repositories.clone();
    let pool = ctx.pool.clone();
    let subject = msg.subject.to_string();
    let stream_seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    let r = req.clone();
    let label = db::detached(async move {
        let mut tx = pool.begin().await?;
        let row: Option<(String, String, Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT scheme, event, body_sha256, body FROM webhook_deliveries
             WHERE source = $1 AND delivery_id = $2",
        )
        .bind(&r.source)
        .bind(&r.delivery_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((scheme, event, sha, body)) = row else {
            return Ok(None);
        };
        let scheme = match scheme.as_str() {
            "github" => WebhookScheme::Github,
            "gitlab" => WebhookScheme::Gitlab,
            _ => WebhookScheme::Standard,
        };
        let (_, routed) = decide(scheme, &event, &body, &rules, &limits, Utc::now(), &registry);
        let key = format!("whr:{}", r.redelivery_id);
        let raw = Raw {
            subject,
            headers: json!({"source": r.source, "delivery_id": r.delivery_id}),
            payload: bytes::Bytes::new(),
        };
        let (verdict, task_id) = make_task(&mut tx, &routed, &key, &r.source, raw, stream_seq).await?;
        sqlx::query(
            "INSERT INTO webhook_audit_log (event_key, source, delivery_id, event, actor, body_sha256, details)
             VALUES ($1, $2, $3, 'webhook_redelivered', $4, $5, $6) ON CONFLICT (event_key) DO NOTHING",
        )
        .bind(format!("redeliver:{}", r.redelivery_id))
        .bind(&r.source)
        .bind(&r.delivery_id)
        .bind(&r.actor)
        .bind(&sha)
        .bind(Json(json!({"redelivery_id": r.redelivery_id, "reason": r.reason, "verdict": verdict,
                          "rule": routed.rule(), "why": routed.reason(), "task_id": task_id})))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let exec = match (&routed, task_id) {
            (Routed::Task { task, .. }, Some(id)) => Some((id, task.clone())),
            _ => None,
        };
        Ok(Some((verdict, exec)))
    })
    .await?;
    let Some((_, exec)) = label else {
        // Bounded, not at once: the delivery may be in this very pull, not yet recorded.
        return Err(Failure::Bounded(
            ErrorCode::Validation,
            format!(
                "no stored delivery {:?} of source {:?} to redeliver (pruned after webhooks.ledger_retention_days?)",
                req.delivery_id, req.source
            ),
        ));
    };
    ctx.metrics
        .webhook_deliveries_total
        .with_label_values(&[source_label(ctx, &req.source).as_str(), "redelivered"])
        .inc();
    Ok(Done {
        exec,
        ..Done::default()
    })
}

async fn poison(
    ctx: &Arc<Ctx>,
    msg: &jetstream::Message,
    code: ErrorCode,
    reason: String,
    body: Option<bytes::Bytes>,
) {
    tracing::warn!(subject = %msg.subject, code = %code, "webhook message cannot succeed; dead-lettering (reason in dead_letters)");
    let (stream, seq, deliveries, stored) = match msg.info() {
        Ok(i) => (
            i.stream.to_owned(),
            i.stream_sequence,
            i.delivered,
            i.published,
        ),
        Err(_) => (String::new(), 0, 1, DateTime::<Utc>::UNIX_EPOCH),
    };
    let item = Item {
        key: header(msg, envelope::headers::MSG_ID)
            .filter(|k| envelope::valid_msg_id(k))
            .map(|k| format!("nats:{k}"))
            .unwrap_or_else(|| envelope::producer_key(None, (&stream, seq), stored)),
        stream_seq: seq,
        deliveries,
        kind: ItemKind::Poison {
            code,
            reason: reason.clone(),
            raw: Raw {
                subject: msg.subject.to_string(),
                headers: crate::ingest::headers_json(msg.headers.as_ref()),
                // A claim-checked body is kept with the dead letter, not left to expire.
                payload: body.unwrap_or_else(|| msg.payload.clone()),
            },
        },
    };
    let pool = ctx.pool.clone();
    let r = db::detached(async move { persist::dead_letter_one(&pool, &item, code, reason).await })
        .await;
    match r {
        Ok(()) => {
            ctx.metrics
                .messages_total
                .with_label_values(&["dead_lettered"])
                .inc();
            if msg.subject.as_str() == topology::SUBJECT_WEBHOOK_DELIVER {
                forget_front(ctx, msg).await;
            }
            let _ = msg.ack_with(AckKind::Term).await;
        }
        Err(e) => {
            tracing::error!(error = %e, "dead letter could not be written; redelivering");
            crate::ingest::nak(ctx, msg).await;
        }
    }
}

/// Removes a dead-lettered delivery from the gateway's ledger front (if the front still holds
/// this body for it), so the sender's redelivery is accepted as new instead of being answered
/// "duplicate" for the whole retention. Best effort: the dead letter is already committed.
async fn forget_front(ctx: &Ctx, msg: &jetstream::Message) {
    use jetstream::kv::Operation;
    let Ok(m) = meta(msg) else {
        return;
    };
    let Ok(kv) = ctx
        .js
        .get_key_value(&ctx.settings.webhooks.ledger_bucket)
        .await
    else {
        tracing::warn!("cannot open the ledger front; a redelivery of the dead-lettered delivery will be answered as a duplicate");
        return;
    };
    let sha = hex::encode(m.body_sha256);
    // The id's value is the body hash, perhaps followed by " published"; the body's value is
    // the delivery id, exactly.
    let keys = [
        (
            delivery::kv_id_key(&m.source, &m.delivery_id),
            sha.clone(),
            true,
        ),
        (
            delivery::kv_body_key(&m.source, &sha),
            m.delivery_id.clone(),
            false,
        ),
    ];
    for (key, expected, prefix) in keys {
        if let Ok(Some(e)) = kv.entry(&key).await {
            let ours = if prefix {
                e.value.starts_with(expected.as_bytes())
            } else {
                e.value == expected.as_bytes()
            };
            if e.operation == Operation::Put && ours {
                if let Err(err) = kv.delete_expect_revision(&key, Some(e.revision)).await {
                    tracing::warn!(error = %err, "could not clear the ledger front after a dead letter");
                }
            }
        }
    }
}

/// Deletes ledger rows (and their bodies) older than the retention, in small batches, once an
/// hour. The `inbox` keys of their tasks stay: the same delivery id never makes a second task.
pub async fn prune(ctx: Arc<Ctx>, shutdown: tokio_util::sync::CancellationToken) {
    let days = i32::try_from(ctx.settings.webhooks.ledger_retention_days).unwrap_or(i32::MAX);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(60),
        Duration::from_secs(3_600),
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        loop {
            let pool = ctx.pool.clone();
            let r = db::detached(async move {
                sqlx::query(
                    "DELETE FROM webhook_deliveries WHERE id IN (
                        SELECT id FROM webhook_deliveries
                        WHERE received_at < now() - make_interval(days => $1) LIMIT 500)",
                )
                .bind(days)
                .execute(&pool)
                .await
                .map(|r| r.rows_affected())
            })
            .await;
            match r {
                Ok(n) if n > 0 => {
                    tracing::info!(rows = n, "pruned webhook ledger rows past retention")
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "pruning the webhook ledger failed; will retry");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_that_is_not_json_is_an_invalid_verdict() {
        let (_, r) = decide(
            WebhookScheme::Github,
            "issues",
            b"\0\xff not json",
            &[],
            &task::Limits::default(),
            Utc::now(),
            &Default::default(),
        );
        assert_eq!(r.verdict(), "invalid");
    }
}
