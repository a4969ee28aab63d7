//! The gateway never answers 2xx for a task JetStream did not acknowledge: with NATS down it
//! answers 503 MHV-007, and it recovers by itself when NATS returns.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{task, TestStack};
use serde_json::Value;
use std::time::{Duration, Instant};

#[tokio::test]
async fn nats_down_means_503_and_recovery_is_automatic() {
    let mut stack = TestStack::start(|_| {}, 1).await;
    assert_eq!(
        stack.create(&task("before"), Some("before")).await.status(),
        202
    );

    stack.nats.kill();
    // Every answer while NATS is down is a 503 with a code — never a 2xx.
    let start = Instant::now();
    let mut saw_503 = 0;
    while start.elapsed() < Duration::from_secs(2) {
        let r = stack
            .create(&task("during"), Some(&format!("during-{saw_503}")))
            .await;
        assert_eq!(r.status(), 503, "a 2xx while NATS is down would be a lie");
        assert!(r.headers().contains_key("retry-after"));
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["code"], "MHV-007");
        saw_503 += 1;
    }
    assert!(saw_503 > 0);
    let r = stack
        .http
        .get(format!("{}/readyz", stack.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);

    stack.nats.restart().unwrap();
    let start = Instant::now();
    loop {
        let r = stack.create(&task("after"), Some("after")).await;
        if r.status() == 202 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "gateway did not recover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        stack.wait_count("SELECT count(*) FROM tasks WHERE message_key IN ('api:tester:before', 'api:tester:after')", 2, Duration::from_secs(10)).await,
        2
    );
    // A 503 means "not confirmed", not "not queued": a publish buffered just before the
    // connection dropped may still land after reconnect. Clients retry with the same
    // Idempotency-Key (docs/api.md), which the ledger collapses into one task.
    stack.stop_workers().await;
}
