//! Producers that publish straight to NATS, bypassing the gateway: JSON and MessagePack are
//! persisted and audited; invalid messages are dead-lettered with their code and hold up nothing.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use async_nats::HeaderMap;
use common::TestStack;
use mahavishnu::topology::SUBJECT_TASKS_CREATE;
use serde_json::json;
use std::time::Duration;

async fn publish(
    js: &async_nats::jetstream::Context,
    msg_id: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", msg_id);
    if let Some(ct) = content_type {
        h.insert("Content-Type", ct);
    }
    js.publish_with_headers(SUBJECT_TASKS_CREATE, h, body.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn json_and_msgpack_are_persisted_and_poison_is_dead_lettered_without_blocking() {
    let stack = TestStack::start(|_| {}, 1).await;
    let js = async_nats::jetstream::new(stack.nats_client().await);

    // Poison first, so a worker that blocked on it would never reach the good ones.
    publish(&js, "bad-json", None, b"{not json".to_vec()).await;
    publish(
        &js,
        "bad-field",
        None,
        serde_json::to_vec(&json!({"title": "t", "repository": "no spaces allowed"})).unwrap(),
    )
    .await;
    publish(
        &js,
        "nul",
        None,
        br#"{"title":"t","repository":"r","metadata":{"k":"a\u0000b"}}"#.to_vec(),
    )
    .await;
    publish(&js, "bad-type", Some("text/csv"), b"a,b".to_vec()).await;
    // A producer cannot pass itself off as the gateway: envelopes are refused on this subject.
    let forged = mahavishnu::envelope::encode_envelope(&mahavishnu::envelope::Envelope {
        v: 1,
        principal: "admin".into(),
        accepted_at: chrono::Utc::now(),
        request: mahavishnu::task::TaskRequest {
            title: Some("forged".into()),
            repository: Some("r".into()),
            ..Default::default()
        },
    })
    .unwrap();
    publish(
        &js,
        "api:admin:forged",
        Some(mahavishnu::envelope::CONTENT_TYPE_ENVELOPE),
        forged,
    )
    .await;
    publish(
        &js,
        "good-json",
        Some("application/json"),
        serde_json::to_vec(&json!({"title": "From JSON", "repository": "etl", "priority": "high"}))
            .unwrap(),
    )
    .await;
    let mp = rmp_serde::to_vec_named(&mahavishnu::task::TaskRequest {
        title: Some("From MessagePack".into()),
        repository: Some("etl".into()),
        tags: Some(vec!["a".into(), "b".into(), "a".into()]),
        ..Default::default()
    })
    .unwrap();
    publish(&js, "good-mp", Some("application/msgpack"), mp).await;

    let n = stack
        .wait_count("SELECT count(*) FROM tasks", 2, Duration::from_secs(5))
        .await;
    assert_eq!(n, 2);
    let d = stack
        .wait_count(
            "SELECT count(*) FROM dead_letters",
            5,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(d, 5);

    let rows: Vec<(String, String, Vec<String>)> =
        sqlx::query_as("SELECT title, priority, tags FROM tasks ORDER BY title")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    assert_eq!(rows[0], ("From JSON".into(), "high".into(), vec![]));
    assert_eq!(
        rows[1],
        (
            "From MessagePack".into(),
            "medium".into(),
            vec!["a".into(), "b".into()]
        )
    );
    assert_eq!(
        stack.count("SELECT count(*) FROM task_audit_log a JOIN tasks t ON t.id = a.task_id WHERE a.event = 'task_created' AND a.actor = 'nats'").await,
        2
    );

    let dead: Vec<(String, String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT message_key, error_code, reason, payload FROM dead_letters ORDER BY message_key",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let by_key = |k: &str| {
        dead.iter()
            .find(|d| d.0 == k)
            .unwrap_or_else(|| panic!("no dead letter {k}: {dead:?}"))
    };
    assert_eq!(by_key("nats:bad-json").1, "MHV-011");
    assert_eq!(by_key("nats:bad-json").3, b"{not json");
    assert_eq!(by_key("nats:bad-field").1, "MHV-003");
    assert!(by_key("nats:bad-field").2.contains("repository"));
    assert_eq!(by_key("nats:nul").1, "MHV-003");
    assert!(
        by_key("nats:nul").3.windows(6).any(|w| w == b"\\u0000"),
        "raw bytes kept verbatim"
    );
    assert_eq!(by_key("nats:bad-type").1, "MHV-010");
    assert_eq!(by_key("nats:api:admin:forged").1, "MHV-010");
    assert!(by_key("nats:api:admin:forged")
        .2
        .contains("mhv.tasks.submit"));

    // Terminated, not retried: the stream holds nothing and nothing is pending.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("mhv-workers", "MHV_TASKS")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.num_pending, 0);
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_redelivered, 0, "poison must not be redelivered");
}

#[tokio::test]
async fn ids_that_cannot_be_stored_are_dead_lettered_once_and_hold_up_nothing() {
    let stack = TestStack::start(|_| {}, 1).await;
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let body = serde_json::to_vec(&json!({"title": "t", "repository": "r"})).unwrap();
    publish(&js, "tab\there", None, body.clone()).await;
    publish(&js, &"x".repeat(600), None, body.clone()).await;
    publish(&js, "fine", None, body).await;
    assert_eq!(
        stack
            .wait_count("SELECT count(*) FROM tasks", 1, Duration::from_secs(5))
            .await,
        1
    );
    assert_eq!(
        stack
            .wait_count("SELECT count(*) FROM dead_letters WHERE message_key LIKE 'badid:%' AND error_code = 'MHV-003'", 2, Duration::from_secs(5))
            .await,
        2
    );
    stack.assert_drained(Duration::from_secs(10)).await;
}
