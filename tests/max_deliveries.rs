//! A finite `nats.consumer.max_deliver`: a message JetStream gives up on is captured from its
//! MAX_DELIVERIES advisory into the dead letters, removed from the work queue, and can be
//! replayed once the cause is fixed.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::time::Duration;

/// JetStream's duplicate window in this test (short, so the test can outwait it).
const WINDOW: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_message_past_max_deliver_is_dead_lettered_from_its_advisory_and_replays_once() {
    let stack = TestStack::start(
        |s| {
            s.nats.consumer.max_deliver = 2;
            s.nats.stream.duplicate_window_secs = WINDOW.as_secs();
            s.worker.nak_delay_ms = 100;
            s.worker.nak_max_delay_ms = 200;
        },
        1,
    )
    .await;
    // A passing failure that lasts: the ledger table is missing, so every delivery fails and
    // is NAKed (an undefined table is not a reason to dead-letter a task).
    sqlx::query("ALTER TABLE inbox RENAME TO inbox_away")
        .execute(&stack.pool)
        .await
        .unwrap();
    let nats = stack.nats_client().await;
    let js = async_nats::jetstream::new(nats);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "order-42");
    let published = std::time::Instant::now();
    js.publish_with_headers(
        mahavishnu::topology::SUBJECT_TASKS_CREATE,
        headers,
        serde_json::to_vec(&task("stranded without advisories"))
            .unwrap()
            .into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let n = stack
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE error_code = 'MHV-015'",
            1,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(n, 1, "the advisory was not captured");
    let (deliveries, subject, payload): (i64, String, Vec<u8>) = sqlx::query_as(
        "SELECT deliveries, subject, payload FROM dead_letters WHERE error_code = 'MHV-015'",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(deliveries, 2);
    assert_eq!(subject, mahavishnu::topology::SUBJECT_TASKS_CREATE);
    assert!(String::from_utf8_lossy(&payload).contains("stranded"));
    // Out of the work queue: nothing is left pending.
    stack.assert_drained(Duration::from_secs(10)).await;

    // Fixed; replayed twice: one task.
    sqlx::query("ALTER TABLE inbox_away RENAME TO inbox")
        .execute(&stack.pool)
        .await
        .unwrap();
    let id: i64 = sqlx::query_scalar("SELECT id FROM dead_letters WHERE error_code = 'MHV-015'")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    let config = stack.settings_file();
    let id = id.to_string();
    let args = ["dlq", "replay", id.as_str()];
    let replay = || stack.mhv(&config, &args);
    // Inside JetStream's duplicate window the id is still remembered: the replay says so.
    if published.elapsed() + Duration::from_millis(500) < WINDOW {
        let (ok, text) = replay().await;
        assert!(!ok && text.contains("duplicate_window"), "{text}");
    }
    // Past the window: replayed twice, one task (the second is inside the replay's window).
    tokio::time::sleep(WINDOW.saturating_sub(published.elapsed()) + Duration::from_millis(500))
        .await;
    for _ in 0..2 {
        let (ok, text) = replay().await;
        assert!(ok, "{text}");
    }
    let n = stack
        .wait_count(
            "SELECT count(*) FROM tasks WHERE title = 'stranded without advisories'",
            1,
            Duration::from_secs(15),
        )
        .await;
    assert_eq!(n, 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        stack
            .count("SELECT count(*) FROM tasks WHERE title = 'stranded without advisories'")
            .await,
        1
    );
}
