//! The fleet-wide semaphore on a real nats-server: a limit of 1 serialises holders across
//! "workers", a dead holder's slot frees itself after the lease time, and a holder that lost
//! its slot learns it.
#![allow(clippy::unwrap_used, missing_docs)]

use mahavishnu::devstack::nats::NatsServer;
use mahavishnu::lease::{self, LeaseError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn store(
    lease_time: Duration,
) -> (
    NatsServer,
    tempfile::TempDir,
    async_nats::jetstream::kv::Store,
) {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(&dir.path().join("nats"), 0).unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let kv = lease::bucket(&js, "MHV_TEST_LEASES", lease_time, 1)
        .await
        .unwrap();
    (nats, dir, kv)
}

/// `try_acquire` that fails the test on a broker error.
async fn take(
    kv: &async_nats::jetstream::kv::Store,
    name: &str,
    limit: u32,
    holder: &str,
) -> Option<lease::Lease> {
    lease::try_acquire(kv, name, limit, holder).await.unwrap()
}

#[tokio::test]
async fn a_limit_of_one_never_lets_two_holders_overlap() {
    let (_nats, _dir, kv) = store(Duration::from_secs(30)).await;
    let spans: Arc<Mutex<Vec<(Instant, Instant, usize)>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..3 {
        let (kv, spans) = (kv.clone(), spans.clone());
        workers.push(tokio::spawn(async move {
            for _ in 0..8 {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                let l = lease::acquire(
                    &kv,
                    "repo-a",
                    1,
                    &format!("worker-{w}"),
                    Duration::from_millis(5),
                    deadline,
                )
                .await
                .unwrap()
                .expect("a slot within 20 s");
                let start = Instant::now();
                tokio::time::sleep(Duration::from_millis(15)).await;
                let end = Instant::now();
                spans.lock().unwrap().push((start, end, w));
                lease::release(&kv, &l).await.unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let mut spans = spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 24);
    spans.sort_by_key(|s| s.0);
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "runs overlapped: {:?} and {:?}",
            pair[0],
            pair[1]
        );
    }
    // Another name has its own slots.
    assert!(take(&kv, "repo-b", 1, "x").await.is_some());
}

#[tokio::test]
async fn a_limit_of_two_admits_two() {
    let (_nats, _dir, kv) = store(Duration::from_secs(30)).await;
    let a = take(&kv, "repo", 2, "a").await.unwrap();
    let b = take(&kv, "repo", 2, "b").await.unwrap();
    assert_ne!(a.key, b.key);
    assert!(take(&kv, "repo", 2, "c").await.is_none());
    lease::release(&kv, &a).await.unwrap();
    assert!(take(&kv, "repo", 2, "c").await.is_some());
}

#[tokio::test]
async fn renewing_keeps_a_slot_and_a_dead_holders_slot_frees_itself() {
    let (_nats, _dir, kv) = store(Duration::from_secs(1)).await;
    // Renewed every 300 ms for 2 s: nobody else gets it.
    let mut held = take(&kv, "repo", 1, "alive").await.unwrap();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(300)).await;
        lease::renew(&kv, &mut held, "alive").await.unwrap();
        assert!(take(&kv, "repo", 1, "other").await.is_none());
    }
    lease::release(&kv, &held).await.unwrap();
    // A holder that stops renewing (a dead worker) loses the slot after the lease time.
    let mut dead = take(&kv, "repo", 1, "dead").await.unwrap();
    let start = Instant::now();
    let next = loop {
        if let Some(l) = take(&kv, "repo", 1, "next").await {
            break l;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the slot never freed itself"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "freed before the lease time"
    );
    // The old holder finds out when it tries to renew or release.
    assert!(matches!(
        lease::renew(&kv, &mut dead, "dead").await,
        Err(LeaseError::Lost(_))
    ));
    assert!(matches!(
        lease::release(&kv, &dead).await,
        Err(LeaseError::Lost(_))
    ));
    lease::release(&kv, &next).await.unwrap();
}
