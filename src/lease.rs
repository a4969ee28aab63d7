//! A counting semaphore across the whole fleet, in a JetStream KV bucket: at most `limit`
//! holders per name (for example per repository), whichever worker replica they run on.
//!
//! Slot `i` of name `n` is the key `{n}.{i}`. Taking a slot is an atomic `create` (it fails if
//! the key exists); keeping it is an `update` that expects the revision we wrote last; giving it
//! back deletes that revision. The bucket's max age is the lease time: a holder that dies stops
//! renewing, its key expires, and the slot frees itself. A holder whose renewal fails has lost
//! its slot and must stop what it guards.
//!
//! Building block for issue 4's per-repository limit; nothing calls it yet.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use std::time::Duration;

/// The bucket (create-or-update: a changed lease time reaches an existing bucket).
pub async fn bucket(
    js: &jetstream::Context,
    name: &str,
    lease: Duration,
    replicas: usize,
) -> Result<kv::Store, async_nats::Error> {
    Ok(js
        .create_or_update_key_value(kv::Config {
            bucket: name.to_owned(),
            description: "Mahavishnu fleet-wide leases (per-repository limits)".into(),
            history: 1,
            max_age: lease,
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?)
}

/// A held slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The key of the slot.
    pub key: String,
    /// The revision we wrote last (the one renewals and the release expect).
    pub revision: u64,
}

/// Why a lease could not be renewed or released.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The slot expired and may be someone else's now: stop what it guards.
    #[error("lease {0} was lost (expired or taken over)")]
    Lost(String),
    /// The broker failed; the lease may still be held.
    #[error(transparent)]
    Broker(#[from] async_nats::Error),
}

/// Takes a free slot of `name` (at most `limit`), or returns `None` when all are held.
/// `holder` is written into the slot for operators (`nats kv get`).
pub async fn try_acquire(
    store: &kv::Store,
    name: &str,
    limit: u32,
    holder: &str,
) -> Result<Option<Lease>, async_nats::Error> {
    for slot in 0..limit {
        let key = format!("{name}.{slot}");
        match store
            .create(&key, Bytes::copy_from_slice(holder.as_bytes()))
            .await
        {
            Ok(revision) => return Ok(Some(Lease { key, revision })),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// Keeps the slot for another lease time. Call it well within the lease time.
pub async fn renew(store: &kv::Store, lease: &mut Lease, holder: &str) -> Result<(), LeaseError> {
    match store
        .update(
            &lease.key,
            Bytes::copy_from_slice(holder.as_bytes()),
            lease.revision,
        )
        .await
    {
        Ok(revision) => {
            lease.revision = revision;
            Ok(())
        }
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
            Err(LeaseError::Lost(lease.key.clone()))
        }
        Err(e) => Err(LeaseError::Broker(e.into())),
    }
}

/// Gives the slot back (only if it is still ours).
pub async fn release(store: &kv::Store, lease: &Lease) -> Result<(), LeaseError> {
    let Err(e) = store
        .delete_expect_revision(&lease.key, Some(lease.revision))
        .await
    else {
        return Ok(());
    };
    // Refused: find out whether the slot is still ours (a broker error) or not (lost).
    match store.entry(&lease.key).await {
        Ok(Some(entry))
            if entry.revision == lease.revision && entry.operation == kv::Operation::Put =>
        {
            Err(LeaseError::Broker(e.into()))
        }
        Ok(_) => Err(LeaseError::Lost(lease.key.clone())),
        Err(_) => Err(LeaseError::Broker(e.into())),
    }
}

/// Waits for a slot, polling every `every`, until `deadline` passes.
pub async fn acquire(
    store: &kv::Store,
    name: &str,
    limit: u32,
    holder: &str,
    every: Duration,
    deadline: tokio::time::Instant,
) -> Result<Option<Lease>, async_nats::Error> {
    loop {
        if let Some(l) = try_acquire(store, name, limit, holder).await? {
            return Ok(Some(l));
        }
        if tokio::time::Instant::now() + every > deadline {
            return Ok(None);
        }
        tokio::time::sleep(every).await;
    }
}
