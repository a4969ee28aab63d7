//! Fault injection on PostgreSQL: while the database refuses connections, the gateway still
//! accepts tasks (they wait in JetStream), reads answer 503 MHV-002, workers redeliver with
//! backoff instead of dead-lettering, and every task is persisted once when it returns.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{task, TestStack};
use mahavishnu::devstack::postgres::admin_url;
use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection};
use std::time::Duration;

async fn set_allow_connections(db: &str, allow: bool) {
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    admin
        .execute(format!(r#"ALTER DATABASE "{db}" ALLOW_CONNECTIONS {allow}"#).as_str())
        .await
        .unwrap();
    if !allow {
        admin
            .execute(
                format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"
                )
                .as_str(),
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn database_outage_delays_tasks_but_loses_none() {
    let mut stack = TestStack::start(
        |s| {
            s.database.acquire_timeout_ms = 500;
            s.worker.nak_delay_ms = 100;
            s.worker.nak_max_delay_ms = 400;
        },
        1,
    )
    .await;
    assert_eq!(
        stack.create(&task("before"), Some("before")).await.status(),
        202
    );
    assert_eq!(
        stack
            .wait_count("SELECT count(*) FROM tasks", 1, Duration::from_secs(5))
            .await,
        1
    );
    let before_id = sqlx::query_scalar::<_, uuid::Uuid>("SELECT id FROM tasks")
        .fetch_one(&stack.pool)
        .await
        .unwrap();

    set_allow_connections(&stack.db.name, false).await;
    for i in 0..20 {
        let r = stack
            .create(&task("during"), Some(&format!("during-{i}")))
            .await;
        assert_eq!(
            r.status(),
            202,
            "the gateway needs no database to accept work"
        );
    }
    let r = stack.get(&format!("/v1/tasks/{before_id}")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "MHV-002");
    // Several redeliveries happen meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    set_allow_connections(&stack.db.name, true).await;

    let n = stack
        .wait_count("SELECT count(*) FROM tasks", 21, Duration::from_secs(20))
        .await;
    if n != 21 {
        let keys: Vec<String> = sqlx::query_scalar("SELECT message_key FROM tasks ORDER BY 1")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
        let js = async_nats::jetstream::new(stack.nats_client().await);
        let mut c: async_nats::jetstream::consumer::PullConsumer = js
            .get_consumer_from_stream("mhv-workers", "MHV_TASKS")
            .await
            .unwrap();
        let info = c.info().await.unwrap().clone();
        let stream = js
            .get_stream("MHV_TASKS")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        let dead: Vec<(String, String, String)> =
            sqlx::query_as("SELECT message_key, error_code, reason FROM dead_letters")
                .fetch_all(&stack.pool)
                .await
                .unwrap();
        let inbox: i64 = stack.count("SELECT count(*) FROM inbox").await;
        panic!(
            "only {n} tasks, inbox {inbox}, dead letters {dead:?}: {keys:?}\nconsumer: pending {} ack_pending {} redelivered {} waiting {} delivered {:?} ack_floor {:?}\nstream: {:?}",
            info.num_pending, info.num_ack_pending, info.num_redelivered, info.num_waiting, info.delivered, info.ack_floor, stream.state
        );
    }
    assert_eq!(stack.count("SELECT count(*) FROM task_audit_log").await, 21);
    assert_eq!(
        stack.count("SELECT count(*) FROM dead_letters").await,
        0,
        "an outage is not a poison message"
    );
    assert_eq!(
        stack.get(&format!("/v1/tasks/{before_id}")).await.status(),
        200
    );
    stack.stop_workers().await;
}
