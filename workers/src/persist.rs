//! The single transactional step: write a batch of messages' effects, each guarded by its
//! ledger key, in one PostgreSQL transaction. The caller acks only after this returns `Ok`.
//!
//! Per message, in the same transaction:
//! - a valid task: `inbox` row (`ON CONFLICT DO NOTHING`), then — only if that row is new — the
//!   `tasks` row and its `task_created` audit row;
//! - a repeat of a key already in the ledger: nothing, unless its body differs, which is recorded
//!   as an `MHV-106` dead letter (the first request with a key stands);
//! - a message that can never succeed: a `dead_letters` row with its code, reason and raw bytes.

use crate::audit;
use mahavishnu::db::SYSTEM_USER_ID;
use mahavishnu::task::NewTask;
use mahavishnu::ErrorCode;
use sqlx::types::Json;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// One message, decoded and classified.
#[derive(Debug, Clone)]
pub struct Item {
    /// Ledger key.
    pub key: String,
    /// Stream sequence (for the ledger and dead letters).
    pub stream_seq: u64,
    /// Deliveries so far.
    pub deliveries: i64,
    /// What it is.
    pub kind: ItemKind,
}

/// A message is either a task to persist or a poison message to dead-letter.
#[derive(Debug, Clone)]
pub enum ItemKind {
    /// A valid task.
    Task {
        /// Derived from the key.
        task_id: Uuid,
        /// The validated task.
        task: NewTask,
        /// Who submitted it.
        principal: String,
        /// Hash of the canonical request.
        fingerprint: [u8; 32],
        /// Raw bytes and headers, kept in case the key turns out to be reused.
        raw: Raw,
    },
    /// A message that can never succeed.
    Poison {
        /// Why.
        code: ErrorCode,
        /// Human-readable reason.
        reason: String,
        /// Raw bytes and headers.
        raw: Raw,
    },
}

impl Item {
    /// The message as received.
    pub fn raw(&self) -> &Raw {
        match &self.kind {
            ItemKind::Task { raw, .. } | ItemKind::Poison { raw, .. } => raw,
        }
    }
}

/// A message as received, for dead letters.
#[derive(Debug, Clone)]
pub struct Raw {
    /// Subject.
    pub subject: String,
    /// Headers as a JSON object of arrays.
    pub headers: serde_json::Value,
    /// Body, verbatim.
    pub payload: bytes::Bytes,
}

/// What happened to a message; decides ack (persisted, duplicate) or term (dead-lettered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its task was written now.
    Persisted,
    /// Its key was already in the ledger (or earlier in this batch) with the same body.
    Duplicate,
    /// Recorded as a dead letter.
    DeadLettered,
}

/// A dead letter to write with [`insert_dead_letters`]: every dead letter goes through it.
pub struct DeadLetter<'a> {
    /// Ledger key of the message (unique with the code).
    pub key: String,
    /// Why, as a code.
    pub code: ErrorCode,
    /// Why, in words.
    pub reason: String,
    /// Stream sequence.
    pub seq: u64,
    /// Deliveries so far.
    pub deliveries: i64,
    /// The message as received.
    pub raw: &'a Raw,
    /// The task it is about (failed executions).
    pub task_id: Option<Uuid>,
}

/// Writes the batch in one transaction and returns one outcome per item, in order.
pub async fn persist_batch(pool: &PgPool, items: &[Item]) -> Result<Vec<Outcome>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let outcomes = persist_in(&mut tx, items).await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// [`persist_batch`] inside a transaction the caller owns (webhook deliveries write their
/// ledger row in the same transaction as the task).
pub async fn persist_in(
    tx: &mut sqlx::PgConnection,
    items: &[Item],
) -> Result<Vec<Outcome>, sqlx::Error> {
    let mut outcomes = vec![Outcome::Duplicate; items.len()];
    let mut first_of_key: HashMap<&str, usize> = HashMap::new();
    let mut dead: Vec<DeadLetter<'_>> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match &item.kind {
            ItemKind::Task { .. } => {
                first_of_key.entry(item.key.as_str()).or_insert(i);
            }
            ItemKind::Poison { code, reason, raw } => {
                outcomes[i] = Outcome::DeadLettered;
                dead.push(DeadLetter {
                    key: item.key.clone(),
                    code: *code,
                    reason: reason.clone(),
                    seq: item.stream_seq,
                    deliveries: item.deliveries,
                    raw,
                    task_id: None,
                });
            }
        }
    }
    // Claim keys in key order: two batches holding the same keys then lock them in the same
    // order and cannot deadlock each other.
    let firsts: Vec<usize> = {
        let mut v: Vec<(&str, usize)> = first_of_key.into_iter().collect();
        v.sort_unstable();
        v.into_iter().map(|(_, i)| i).collect()
    };

    // 1. Claim ledger keys. RETURNING tells which claims are new.
    let (mut keys, mut fps, mut ids, mut seqs) = (vec![], vec![], vec![], vec![]);
    for &i in &firsts {
        if let ItemKind::Task {
            task_id,
            fingerprint,
            ..
        } = &items[i].kind
        {
            keys.push(items[i].key.clone());
            fps.push(fingerprint.to_vec());
            ids.push(*task_id);
            seqs.push(i64::try_from(items[i].stream_seq).unwrap_or(i64::MAX));
        }
    }
    let claimed: HashSet<String> = if keys.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_scalar::<_, String>(
            "INSERT INTO inbox (message_key, fingerprint, task_id, stream_seq)
             SELECT k, f, t, s FROM UNNEST($1::text[], $2::bytea[], $3::uuid[], $4::int8[]) AS x(k, f, t, s)
             ON CONFLICT (message_key) DO NOTHING
             RETURNING message_key",
        )
        .bind(&keys)
        .bind(&fps)
        .bind(&ids)
        .bind(&seqs)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect()
    };

    // 2. Tasks and audit rows for the new claims.
    let mut t = TaskColumns::default();
    for &i in &firsts {
        if let ItemKind::Task {
            task_id,
            task,
            principal,
            ..
        } = &items[i].kind
        {
            if claimed.contains(&items[i].key) {
                t.push(*task_id, task, principal, &items[i].key);
                outcomes[i] = Outcome::Persisted;
            }
        }
    }
    if !t.ids.is_empty() {
        sqlx::query(
            "INSERT INTO tasks (id, title, description, repository, priority, deadline, metadata, tags,
                                created_by, submitted_by, message_key, status)
             SELECT id, title, descr, repo, prio, dl, md,
                    ARRAY(SELECT jsonb_array_elements_text(tg)), $11, sub, k, 'queued'
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
                         $7::jsonb[], $8::jsonb[], $9::text[], $10::text[])
                  AS x(id, title, descr, repo, prio, dl, md, tg, sub, k)",
        )
        .bind(&t.ids)
        .bind(&t.titles)
        .bind(&t.descriptions)
        .bind(&t.repositories)
        .bind(&t.priorities)
        .bind(&t.deadlines)
        .bind(&t.metadata)
        .bind(&t.tags)
        .bind(&t.principals)
        .bind(&t.keys)
        .bind(SYSTEM_USER_ID)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO task_audit_log (task_id, event, actor, details)
             SELECT id, 'task_created', actor, d FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[]) AS x(id, actor, d)",
        )
        .bind(&t.ids)
        .bind(&t.principals)
        .bind(&t.audit)
        .execute(&mut *tx)
        .await?;
    }

    // 3. Repeats: same key, same body → duplicate; different body → MHV-106 dead letter.
    let repeats: Vec<usize> = (0..items.len())
        .filter(|&i| {
            matches!(items[i].kind, ItemKind::Task { .. }) && outcomes[i] == Outcome::Duplicate
        })
        .collect();
    if !repeats.is_empty() {
        let repeat_keys: Vec<String> = repeats.iter().map(|&i| items[i].key.clone()).collect();
        let stored: HashMap<String, Vec<u8>> = sqlx::query_as::<_, (String, Vec<u8>)>(
            "SELECT message_key, fingerprint FROM inbox WHERE message_key = ANY($1)",
        )
        .bind(&repeat_keys)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        for &i in &repeats {
            if let ItemKind::Task {
                fingerprint, raw, ..
            } = &items[i].kind
            {
                let same = stored
                    .get(&items[i].key)
                    .is_none_or(|f| f.as_slice() == fingerprint.as_slice());
                if !same {
                    outcomes[i] = Outcome::DeadLettered;
                    dead.push(DeadLetter {
                        key: format!("{}#{}", items[i].key, hex::encode(&fingerprint[..8])),
                        code: ErrorCode::IdempotencyConflict,
                        reason: format!(
                            "key {:?} was already used for a different request; the first one stands",
                            items[i].key
                        ),
                        seq: items[i].stream_seq,
                        deliveries: items[i].deliveries,
                        raw,
                        task_id: None,
                    });
                }
            }
        }
    }

    // 4. Dead letters.
    if !dead.is_empty() {
        insert_dead_letters(&mut *tx, &dead).await?;
    }
    Ok(outcomes)
}

/// Records one message as a dead letter in its own transaction (used when a message cannot be
/// written for a permanent reason that validation did not foresee).
pub async fn dead_letter_one(
    pool: &PgPool,
    item: &Item,
    code: ErrorCode,
    reason: String,
) -> Result<(), sqlx::Error> {
    let raw = item.raw();
    let mut tx = pool.begin().await?;
    insert_dead_letters(
        &mut tx,
        &[DeadLetter {
            key: item.key.clone(),
            code,
            reason,
            seq: item.stream_seq,
            deliveries: item.deliveries,
            raw,
            task_id: None,
        }],
    )
    .await?;
    tx.commit().await
}

/// Writes dead letters. A key and code already there is only rewritten if it was replayed since:
/// a replay that fails again is a dead letter again. Stamped with `clock_timestamp()`, as an
/// executor's verdict transaction may have begun long before.
pub async fn insert_dead_letters(
    tx: &mut sqlx::PgConnection,
    dead: &[DeadLetter<'_>],
) -> Result<(), sqlx::Error> {
    let keys: Vec<&str> = dead.iter().map(|d| d.key.as_str()).collect();
    let subjects: Vec<&str> = dead.iter().map(|d| d.raw.subject.as_str()).collect();
    let seqs: Vec<i64> = dead
        .iter()
        .map(|d| i64::try_from(d.seq).unwrap_or(i64::MAX))
        .collect();
    let deliveries: Vec<i64> = dead.iter().map(|d| d.deliveries).collect();
    let codes: Vec<&str> = dead.iter().map(|d| d.code.as_str()).collect();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    let headers: Vec<Json<&serde_json::Value>> =
        dead.iter().map(|d| Json(&d.raw.headers)).collect();
    let payloads: Vec<&[u8]> = dead.iter().map(|d| d.raw.payload.as_ref()).collect();
    let tasks: Vec<Option<Uuid>> = dead.iter().map(|d| d.task_id).collect();
    sqlx::query(
        "INSERT INTO dead_letters (message_key, subject, stream_seq, deliveries, error_code, reason, headers, payload,
                                   task_id, created_at)
         SELECT *, clock_timestamp() FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[],
                                                 $6::text[], $7::jsonb[], $8::bytea[], $9::uuid[])
         ON CONFLICT (message_key, error_code) DO UPDATE
           SET replayed_at = NULL, reason = EXCLUDED.reason, deliveries = EXCLUDED.deliveries,
               headers = EXCLUDED.headers, payload = EXCLUDED.payload, created_at = clock_timestamp()
           WHERE dead_letters.replayed_at IS NOT NULL",
    )
    .bind(&keys)
    .bind(&subjects)
    .bind(&seqs)
    .bind(&deliveries)
    .bind(&codes)
    .bind(&reasons)
    .bind(&headers)
    .bind(&payloads)
    .bind(&tasks)
    .execute(tx)
    .await?;
    Ok(())
}

#[derive(Default)]
struct TaskColumns {
    ids: Vec<Uuid>,
    titles: Vec<String>,
    descriptions: Vec<Option<String>>,
    repositories: Vec<String>,
    priorities: Vec<&'static str>,
    deadlines: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    metadata: Vec<Json<serde_json::Value>>,
    tags: Vec<Json<Vec<String>>>,
    principals: Vec<String>,
    keys: Vec<String>,
    audit: Vec<Json<serde_json::Value>>,
}

impl TaskColumns {
    fn push(&mut self, id: Uuid, t: &NewTask, principal: &str, key: &str) {
        self.ids.push(id);
        self.titles.push(t.title.clone());
        self.descriptions.push(t.description.clone());
        self.repositories.push(t.repository.clone());
        self.priorities.push(t.priority.as_str());
        self.deadlines.push(t.deadline);
        self.metadata.push(Json(t.metadata.clone()));
        self.tags.push(Json(t.tags.clone()));
        self.principals.push(principal.to_owned());
        self.keys.push(key.to_owned());
        self.audit.push(Json(audit::task_created_details(t, key)));
    }
}
