//! A server that lost its stream (wiped store, `nats stream rm`): workers re-create the stream
//! and consumer by themselves, and a keyless producer message numbered 1 again in the new stream
//! is a new task, not a "duplicate" of the old stream's message 1.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::TestStack;
use mahavishnu::topology::SUBJECT_TASKS_CREATE;
use std::time::Duration;

/// Publishes a keyless task and returns its stream sequence. Under a loaded suite the first
/// publish into a just re-created stream has, rarely, gone unanswered: on a timeout it asks the
/// stream whether the message landed, and publishes again only if it did not (a keyless message
/// cannot be retried blindly without making a second task).
async fn publish_keyless(js: &async_nats::jetstream::Context, title: &str) -> u64 {
    let body = serde_json::to_vec(&serde_json::json!({"title": title, "repository": "r"})).unwrap();
    let last = || async {
        let mut s = js.get_stream("MHV_TASKS").await.unwrap();
        s.info().await.unwrap().state.last_sequence
    };
    for _ in 0..3 {
        let before = last().await;
        match js
            .publish(SUBJECT_TASKS_CREATE, body.clone().into())
            .await
            .unwrap()
            .await
        {
            Ok(ack) => return ack.sequence,
            Err(e) if e.kind() == async_nats::jetstream::context::PublishErrorKind::TimedOut => {
                let after = last().await;
                if after > before {
                    return after;
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("three publishes went unanswered");
}

#[tokio::test]
async fn workers_recreate_a_lost_stream_and_keyless_sequences_do_not_collide() {
    let mut stack = TestStack::start(|_| {}, 1).await;
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .ack_timeout(Duration::from_secs(5))
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
