//! Two real worker processes share the load; SIGKILL to one mid-stream loses no task and
//! duplicates none; SIGTERM lets a worker finish what it holds and exit cleanly.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::TestStack;
use mahavishnu::devstack::send_signal;
use mahavishnu::topology::SUBJECT_TASKS_CREATE;
use std::time::{Duration, Instant};

async fn publish_n(stack: &TestStack, prefix: &str, n: usize) {
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("{prefix}-{i}").as_str());
        let body = serde_json::to_vec(
            &serde_json::json!({"title": format!("t{i}"), "repository": "fleet"}),
        )
        .unwrap();
        acks.push(
            js.publish_with_headers(SUBJECT_TASKS_CREATE, h, body.into())
                .await
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }
}

#[tokio::test]
async fn sigkill_mid_stream_loses_nothing_and_duplicates_nothing() {
    let mut stack = TestStack::with(|s| s.worker.batch_size = 16).await;
    let mut a = stack.spawn_worker_process();
    let mut b = stack.spawn_worker_process();
    stack.wait_stream().await;

    // Warm up both workers.
    publish_n(&stack, "warm", 400).await;
    assert_eq!(
        stack
            .wait_count("SELECT count(*) FROM tasks", 400, Duration::from_secs(20))
            .await,
        400
    );

    // Now a larger stream, and kill one worker while it is in the middle of it.
    const N: i64 = 3000;
    let publisher = {
        let url = stack.nats.url();
        tokio::spawn(async move {
            let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
            for i in 0..N {
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Msg-Id", format!("run-{i}").as_str());
                let body = serde_json::to_vec(
                    &serde_json::json!({"title": format!("r{i}"), "repository": "fleet"}),
                )
                .unwrap();
                js.publish_with_headers(SUBJECT_TASKS_CREATE, h, body.into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        })
    };
    let start = Instant::now();
    while stack
        .count("SELECT count(*) FROM tasks WHERE message_key LIKE 'nats:run-%'")
        .await
        < N / 4
    {
        assert!(start.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.kill().unwrap(); // SIGKILL
    a.wait().unwrap();
    publisher.await.unwrap();

    let done = stack
        .wait_count(
            "SELECT count(*) FROM tasks WHERE message_key LIKE 'nats:run-%'",
            N,
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(done, N, "every task persisted after the kill");
    // Let redeliveries of the killed worker's unacked messages come and go.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        stack.count("SELECT count(*) FROM tasks").await,
        N + 400,
        "no duplicates"
    );
    assert_eq!(
        stack.count("SELECT count(*) FROM task_audit_log").await,
        N + 400,
        "one audit row each"
    );
    assert_eq!(stack.count("SELECT count(*) FROM dead_letters").await, 0);

    // SIGTERM: the survivor stops pulling, finishes in-flight work, exits 0.
    send_signal(b.id() as i32, libc::SIGTERM);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = b.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "worker did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "graceful exit, got {status}");
    stack.stop_workers().await;
}

fn persisted_count(metrics: &str) -> i64 {
    metrics
        .lines()
        .find(|l| l.starts_with(r#"mhv_worker_messages_total{outcome="persisted"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn two_workers_share_the_load() {
    let stack = TestStack::with(|s| s.worker.batch_size = 8).await;
    let ports = [
        mahavishnu::devstack::free_port().unwrap(),
        mahavishnu::devstack::free_port().unwrap(),
    ];
    let mut children: Vec<_> = ports
        .iter()
        .map(|port| {
            stack.spawn_worker_process_with(&[(
                "MHV_WORKER__METRICS_LISTEN",
                format!("127.0.0.1:{port}"),
            )])
        })
        .collect();
    stack.wait_stream().await;
    // Both workers consuming (not still starting) before the load arrives.
    for port in ports {
        let start = Instant::now();
        loop {
            let up = match stack
                .http
                .get(format!("http://127.0.0.1:{port}/metrics"))
                .send()
                .await
            {
                Ok(r) => r
                    .text()
                    .await
                    .unwrap_or_default()
                    .contains("mhv_worker_up 1"),
                Err(_) => false,
            };
            if up {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "worker on {port} never came up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    publish_n(&stack, "share", 2000).await;
    assert_eq!(
        stack
            .wait_count("SELECT count(*) FROM tasks", 2000, Duration::from_secs(30))
            .await,
        2000
    );
    let mut handled = Vec::new();
    for port in ports {
        let text = stack
            .http
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        handled.push(persisted_count(&text));
    }
    assert_eq!(handled.iter().sum::<i64>(), 2000, "{handled:?}");
    assert!(
        handled.iter().all(|n| *n > 0),
        "both workers persisted tasks: {handled:?}"
    );
    for c in &mut children {
        send_signal(c.id() as i32, libc::SIGTERM);
        assert!(c.wait().unwrap().success());
    }
}
