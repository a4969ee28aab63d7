//! Effectively-once: the same Idempotency-Key or Nats-Msg-Id, sent 20 times — concurrently,
//! after JetStream's duplicate window, and after a nats-server restart — yields one task row.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use async_nats::HeaderMap;
use common::{task, TestStack};
use mahavishnu::topology::SUBJECT_TASKS_CREATE;
use serde_json::Value;
use std::time::Duration;

async fn send_20(stack: &TestStack, key: &str) -> Vec<String> {
    let futs = (0..20).map(|_| async {
        let r = stack.create(&task("Once"), Some(key)).await;
        assert_eq!(r.status(), 202);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    });
    futures::future::join_all(futs).await
}

#[tokio::test]
async fn one_idempotency_key_is_one_task_across_window_and_restart() {
    // A 1-second JetStream duplicate window, so the test outlives it.
    let mut stack = TestStack::start(|s| s.nats.stream.duplicate_window_secs = 1, 1).await;

    let ids = send_20(&stack, "order-42").await;
    assert!(
        ids.iter().all(|i| i == &ids[0]),
        "every answer names the same task"
    );
    let id = ids[0].clone();
    let sql = "SELECT count(*) FROM tasks WHERE message_key = 'api:tester:order-42'";
    assert_eq!(stack.wait_count(sql, 1, Duration::from_secs(5)).await, 1);

    // Past the window: JetStream no longer remembers the id; the ledger does.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ids = send_20(&stack, "order-42").await;
    assert!(ids.iter().all(|i| i == &id));

    // Across a nats-server restart (store kept).
    stack.nats.kill();
    stack.nats.restart().unwrap();
    stack.wait_ready().await;
    let ids = loop {
        // The gateway's connection comes back by itself; until then it answers 503.
        let r = stack.create(&task("Once"), Some("order-42")).await;
        if r.status() == 202 {
            break send_20(&stack, "order-42").await;
        }
        assert_eq!(r.status(), 503);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(ids.iter().all(|i| i == &id));

    // Every message drained (none left pending or unacknowledged), then count.
    stack.assert_drained(Duration::from_secs(20)).await;
    assert_eq!(stack.count("SELECT count(*) FROM tasks").await, 1);
    assert_eq!(stack.count("SELECT count(*) FROM task_audit_log").await, 1);
    assert_eq!(stack.count("SELECT count(*) FROM inbox").await, 1);
    assert!(
        stack.count("SELECT count(*) FROM dead_letters").await == 0,
        "true retries are not conflicts"
    );
    stack.stop_workers().await;
}

#[tokio::test]
async fn one_nats_msg_id_is_one_task_across_window_and_restart() {
    let mut stack = TestStack::start(|s| s.nats.stream.duplicate_window_secs = 1, 1).await;
    let body =
        serde_json::to_vec(&serde_json::json!({"title": "direct", "repository": "etl"})).unwrap();
    let publish_20 = |url: String, body: Vec<u8>| async move {
        let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
        for _ in 0..20 {
            let mut h = HeaderMap::new();
            h.insert("Nats-Msg-Id", "etl-run-7");
            js.publish_with_headers(SUBJECT_TASKS_CREATE, h, body.clone().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    publish_20(stack.nats.url(), body.clone()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish_20(stack.nats.url(), body.clone()).await;
    stack.nats.kill();
    stack.nats.restart().unwrap();
    publish_20(stack.nats.url(), body.clone()).await;
    stack.assert_drained(Duration::from_secs(20)).await;
    assert_eq!(
        stack
            .count("SELECT count(*) FROM tasks WHERE message_key = 'nats:etl-run-7'")
            .await,
        1
    );
    assert_eq!(stack.count("SELECT count(*) FROM tasks").await, 1);
    stack.stop_workers().await;
}

#[tokio::test]
async fn a_reused_key_with_a_different_body_is_recorded_and_the_first_stands() {
    let stack = TestStack::start(|s| s.nats.stream.duplicate_window_secs = 1, 1).await;
    assert_eq!(stack.create(&task("First"), Some("k")).await.status(), 202);
    stack
        .wait_count("SELECT count(*) FROM tasks", 1, Duration::from_secs(5))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(stack.create(&task("Second"), Some("k")).await.status(), 202);
    let n = stack
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE error_code = 'MHV-106'",
            1,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(n, 1);
    let title: String = sqlx::query_scalar("SELECT title FROM tasks")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(title, "First");
}
