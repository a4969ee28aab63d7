//! A server that lost its stream (wiped store, `nats stream rm`): workers re-create the stream
//! and consumer by themselves, and a keyless producer message numbered 1 again in the new stream
//! is a new task, not a "duplicate" of the old stream's message 1.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::TestStack;
use mahavishnu::topology::SUBJECT_TASKS_CREATE;
use std::time::Duration;

async fn publish_keyless(js: &async_nats::jetstream::Context, title: &str) -> u64 {
    let body = serde_json::to_vec(&serde_json::json!({"title": title, "repository": "r"})).unwrap();
    js.publish(SUBJECT_TASKS_CREATE, body.into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

#[tokio::test]
async fn workers_recreate_a_lost_stream_and_keyless_sequences_do_not_collide() {
    let mut stack = TestStack::start(|_| {}, 1).await;
    // A generous ack timeout: the suite runs many servers at once on two cores, and a keyless
    // publish cannot be retried without making a second task.
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(30))
        .ack_timeout(Duration::from_secs(30))
        .build(stack.nats_client().await);
    assert_eq!(publish_keyless(&js, "before").await, 1);
    assert_eq!(
        stack
            .wait_count("SELECT count(*) FROM tasks", 1, Duration::from_secs(5))
            .await,
        1
    );

    // The gateway would re-create the stream too: stop it, so only the worker can.
    stack.stop_gateway().await;
    js.delete_stream("MHV_TASKS").await.unwrap();
    stack.wait_stream().await;
    stack.wait_pulling().await;

    assert_eq!(
        publish_keyless(&js, "after").await,
        1,
        "the new stream starts again at 1"
    );
    assert_eq!(
        stack
            .wait_count("SELECT count(*) FROM tasks", 2, Duration::from_secs(10))
            .await,
        2
    );
    let titles: Vec<String> = sqlx::query_scalar("SELECT title FROM tasks ORDER BY created_at")
        .fetch_all(&stack.pool)
        .await
        .unwrap();
    assert_eq!(titles, ["before", "after"]);
    assert_eq!(stack.count("SELECT count(*) FROM dead_letters").await, 0);
    stack.stop_workers().await;
}
