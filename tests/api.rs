//! The HTTP API end to end: real gateway on loopback, real JetStream, real workers, real PostgreSQL.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{task, TestStack, API_KEY};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_created_task_is_read_back_persisted_with_one_audit_row_within_a_second() {
    let stack = TestStack::start(|_| {}, 1).await;
    stack.wait_pulling().await;
    let started = Instant::now();
    let resp = stack.create(&task("Ship it"), None).await;
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "queued");
    assert_eq!(
        location,
        format!("/v1/tasks/{}", body["id"].as_str().unwrap())
    );

    let task = loop {
        let r = stack.get(&location).await;
        if r.status() == 200 {
            break r.json::<Value>().await.unwrap();
        }
        assert_eq!(r.status(), 404, "unexpected {:?}", r.text().await);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "not persisted within a second"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    assert_eq!(task["title"], "Ship it");
    assert_eq!(task["status"], "queued");
    assert_eq!(task["priority"], "medium");
    assert_eq!(task["submitted_by"], "tester");
    assert_eq!(task["metadata"], json!({"k": "v"}));

    let audit: Value = stack
        .get(&format!("{location}/audit"))
        .await
        .json()
        .await
        .unwrap();
    let rows = audit.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{audit}");
    assert_eq!(rows[0]["event"], "task_created");
    assert_eq!(rows[0]["actor"], "tester");
    assert_eq!(
        rows[0]["details"]["description"],
        "[REDACTED (11 characters)]"
    );
    assert_eq!(rows[0]["details"]["metadata"], "[REDACTED (9 characters)]");
    assert_eq!(
        stack.count("SELECT count(*) FROM task_audit_log").await,
        1,
        "exactly one audit row in the database"
    );
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn bad_requests_get_a_code_and_recovery_and_queue_nothing() {
    let stack = TestStack::start(|s| s.gateway.body_limit_bytes = 4096, 1).await;
    let base = stack.base();
    let http = &stack.http;

    // No key, wrong key.
    let (s, e) = error_of(
        http.post(format!("{base}/v1/tasks"))
            .json(&task("x"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, e["code"].as_str().unwrap()), (401, "MHV-004"));
    assert!(!e["recovery"].as_str().unwrap().is_empty());
    let (s, _) = error_of(
        http.post(format!("{base}/v1/tasks"))
            .bearer_auth("nope")
            .json(&task("x"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 401);

    // Authentication comes before the body is read: a huge unauthenticated body gets 401.
    let (s, e) = error_of(
        http.post(format!("{base}/v1/tasks"))
            .body(vec![b'x'; 8_000])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, e["code"].as_str().unwrap()), (401, "MHV-004"));
    // Wrong method: still an error body with a code.
    let (s, e) = error_of(
        http.delete(format!("{base}/v1/tasks"))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, e["code"].as_str().unwrap()), (405, "MHV-003"));

    // Malformed JSON, unknown field, wrong media type.
    let post_raw = |ct: &'static str, body: &'static str| {
        http.post(format!("{base}/v1/tasks"))
            .bearer_auth(API_KEY)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let (s, e) = error_of(post_raw("application/json", "{\"title\":").await.unwrap()).await;
    assert_eq!((s, e["code"].as_str().unwrap()), (400, "MHV-011"));
    let (s, e) = error_of(
        post_raw(
            "application/json",
            r#"{"title":"t","repository":"r","colour":"red"}"#,
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!((s, e["code"].as_str().unwrap()), (400, "MHV-011"));
    assert!(e["message"].as_str().unwrap().contains("colour"), "{e}");
    let (s, e) = error_of(post_raw("text/plain", "hi").await.unwrap()).await;
    assert_eq!((s, e["code"].as_str().unwrap()), (415, "MHV-010"));

    // Validation: every problem reported.
    let (s, e) = error_of(
        stack
            .create(&json!({"title": "\u{0}", "repository": "a/b", "priority": "urgent", "deadline": "2001-01-01T00:00:00Z"}), None)
            .await,
    )
    .await;
    assert_eq!((s, e["code"].as_str().unwrap()), (422, "MHV-003"));
    let mut fields: Vec<&str> = e["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    fields.sort();
    assert_eq!(fields, ["deadline", "priority", "repository", "title"]);

    // Too large, bad idempotency key.
    let big = json!({"title": "t", "repository": "r", "description": "x".repeat(5000)});
    let (s, e) = error_of(stack.create(&big, None).await).await;
    assert_eq!((s, e["code"].as_str().unwrap()), (413, "MHV-009"));
    let (s, e) = error_of(stack.create(&task("t"), Some("has space")).await).await;
    assert_eq!((s, e["code"].as_str().unwrap()), (400, "MHV-003"));

    // Reads: malformed id, unknown id.
    let (s, e) = error_of(stack.get("/v1/tasks/not-a-uuid").await).await;
    assert_eq!((s, e["code"].as_str().unwrap()), (400, "MHV-003"));
    let (s, e) = error_of(
        stack
            .get(&format!("/v1/tasks/{}", uuid::Uuid::new_v4()))
            .await,
    )
    .await;
    assert_eq!((s, e["code"].as_str().unwrap()), (404, "MHV-100"));

    // Nothing was queued or written by any of that.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stack.count("SELECT count(*) FROM tasks").await, 0);
    assert_eq!(stack.count("SELECT count(*) FROM dead_letters").await, 0);
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let info = js
        .get_stream("MHV_TASKS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.state.last_sequence, 0, "nothing reached the stream");
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let stack = TestStack::start(|_| {}, 1).await;
    assert_eq!(
        stack
            .http
            .get(format!("{}/healthz", stack.base()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        stack
            .http
            .get(format!("{}/readyz", stack.base()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(stack.create(&task("m"), None).await.status(), 202);
    let metrics = stack
        .http
        .get(format!("{}/metrics", stack.base()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"task_creation_total{repository="core",status="accepted"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("task_creation_duration_seconds_bucket"));
}

#[tokio::test]
async fn reads_answer_503_when_no_worker_runs() {
    let stack = TestStack::start(|_| {}, 0).await;
    let (s, e) = error_of(
        stack
            .get(&format!("/v1/tasks/{}", uuid::Uuid::new_v4()))
            .await,
    )
    .await;
    assert_eq!((s, e["code"].as_str().unwrap()), (503, "MHV-008"));
}
