//! Webhook ingestion end to end: deliveries signed by openssl (not our code), posted over real
//! HTTP to the gateway, through JetStream to the workers and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::type_complexity, missing_docs)]

mod common;

use common::TestStack;
use futures::StreamExt as _;
use mahavishnu::config::{
    Settings, WebhookRule, WebhookScheme, WebhookSecret, WebhookSource, WebhookTaskTemplate,
};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GH_SECRET: &str = "gh-secret-It's a Secret to Everybody";
const GH_SECRET_NEW: &str = "gh-secret-rotated-2026";
const GL_TOKEN: &str = "gitlab-token-0123456789";
const STD_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

/// Runs openssl with `args`, the body on stdin; returns stdout.
fn openssl(args: &[&str], body: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl must be installed");
    let mut stdin = child.stdin.take().unwrap();
    let body = body.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&body).unwrap());
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    writer.join().unwrap();
    assert!(child.wait().unwrap().success());
    out
}

/// `sha256=<hex>` as GitHub sends it, computed by `openssl dgst -hmac`.
fn github_signature(secret: &str, body: &[u8]) -> String {
    let out = String::from_utf8(openssl(&["dgst", "-sha256", "-hmac", secret], body)).unwrap();
    // "SHA2-256(stdin)= <hex>" (or "(stdin)= <hex>" on older releases).
    format!("sha256={}", out.split_whitespace().last().unwrap())
}

/// `v1,<base64>` as Standard Webhooks senders send it, the MAC computed by openssl.
fn standard_signature(whsec: &str, id: &str, ts: i64, body: &[u8]) -> String {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(whsec.trim_start_matches("whsec_"))
        .unwrap();
    let mut signed = format!("{id}.{ts}.").into_bytes();
    signed.extend_from_slice(body);
    let mac = openssl(
        &[
            "dgst",
            "-sha256",
            "-mac",
            "HMAC",
            "-macopt",
            &format!("hexkey:{}", hex::encode(key)),
            "-binary",
        ],
        &signed,
    );
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac)
    )
}

fn secret(id: &str, value: &str) -> WebhookSecret {
    WebhookSecret::inline(id, value)
}

/// A Standard Webhooks source signed with the official test vector's secret.
fn standard_source(rules: Vec<WebhookRule>) -> WebhookSource {
    WebhookSource {
        scheme: WebhookScheme::Standard,
        secrets: vec![secret("sw-1", STD_SECRET)],
        body_limit_bytes: 1 << 20,
        tolerance_secs: 300,
        rules,
    }
}

fn template(title: &str, repository: &str) -> WebhookTaskTemplate {
    WebhookTaskTemplate {
        title: title.into(),
        repository: repository.into(),
        description: None,
        priority: None,
        action: None,
        tags: vec![],
    }
}

/// A rule without filters; set `actions`, `labels` or `branches` with struct update syntax.
fn rule(name: &str, event: &str, task: WebhookTaskTemplate) -> WebhookRule {
    WebhookRule {
        name: name.into(),
        event: event.into(),
        actions: vec![],
        labels: vec![],
        branches: vec![],
        task,
    }
}

/// The rules docs/webhooks.md gives for GitHub.
fn github_rules() -> Vec<WebhookRule> {
    vec![
        WebhookRule {
            actions: vec!["opened".into(), "labeled".into()],
            ..rule(
                "issue-opened-or-labeled",
                "issues",
                WebhookTaskTemplate {
                    description: Some("{issue.html_url}".into()),
                    priority: Some("high".into()),
                    action: Some("triage".into()),
                    tags: vec!["github".into(), "issue".into()],
                    ..template("Issue #{issue.number}: {issue.title}", "{repository.name}")
                },
            )
        },
        WebhookRule {
            actions: vec!["opened".into()],
            ..rule(
                "pr-opened",
                "pull_request",
                template(
                    "Review PR #{pull_request.number}: {pull_request.title}",
                    "{repository.name}",
                ),
            )
        },
        WebhookRule {
            branches: vec!["$default".into()],
            ..rule(
                "push-default-branch",
                "push",
                template("Build {after} on {repository.name}", "{repository.name}"),
            )
        },
    ]
}

fn github_source(secrets: Vec<WebhookSecret>) -> WebhookSource {
    WebhookSource {
        scheme: WebhookScheme::Github,
        secrets,
        body_limit_bytes: 25 * 1024 * 1024,
        tolerance_secs: 300,
        rules: github_rules(),
    }
}

fn with_github(s: &mut Settings) {
    s.webhooks.sources.insert(
        "github".into(),
        github_source(vec![secret("gh-1", GH_SECRET)]),
    );
}

fn issue(action: &str, number: u64, title: &str, body: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "action": action,
        "issue": {"number": number, "title": title, "body": body,
                  "html_url": format!("https://github.com/acme/demo/issues/{number}"),
                  "labels": [{"name": "bug"}]},
        "repository": {"name": "demo", "full_name": "acme/demo", "default_branch": "main"},
        "sender": {"login": "octocat"}
    }))
    .unwrap()
}

fn push(reference: &str, after: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "ref": reference, "before": "0000000", "after": after,
        "repository": {"name": "demo", "full_name": "acme/demo", "default_branch": "main"},
        "pusher": {"name": "octocat"}
    }))
    .unwrap()
}

async fn post_github(
    stack: &TestStack,
    source: &str,
    delivery: &str,
    event: &str,
    body: Vec<u8>,
    secret: &str,
) -> reqwest::Response {
    let sig = github_signature(secret, &body);
    stack
        .http
        .post(format!("{}/v1/webhooks/{source}", stack.base()))
        .header("X-GitHub-Delivery", delivery)
        .header("X-GitHub-Event", event)
        .header("X-Hub-Signature-256", sig)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// The value of one sample in a Prometheus text exposition, whatever the label order.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The task stream's last sequence number (what has ever been published to it).
async fn stream_last_seq(stack: &TestStack) -> u64 {
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let mut stream = js
        .get_stream(&stack.settings.nats.stream.name)
        .await
        .unwrap();
    stream.info().await.unwrap().state.last_sequence
}

async fn gateway_metrics(stack: &TestStack) -> String {
    stack
        .http
        .get(format!("{}/metrics", stack.base()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn github_payloads_signed_with_openssl_become_the_tasks_the_rules_promise() {
    let stack = TestStack::start(with_github, 1).await;
    stack.wait_pulling().await;
    let cases: [(&str, &str, Vec<u8>); 4] = [
        (
            "d-issue",
            "issues",
            issue("opened", 42, "Crash on start", "steps..."),
        ),
        ("d-push-main", "push", push("refs/heads/main", "abc1234")),
        (
            "d-push-feature",
            "push",
            push("refs/heads/feature", "def5678"),
        ),
        (
            "d-closed",
            "issues",
            issue("closed", 42, "Crash on start", ""),
        ),
    ];
    for (delivery, event, body) in cases {
        let r = post_github(&stack, "github", delivery, event, body, GH_SECRET).await;
        assert_eq!(r.status(), 202, "{delivery}: {:?}", r.text().await);
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["duplicate"], false);
        assert_eq!(b["delivery_id"], delivery);
    }
    let n = stack
        .wait_count(
            "SELECT count(*) FROM webhook_deliveries",
            4,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(n, 4, "every delivery is recorded, routed or not");
    let rows: Vec<(String, String, Option<String>, Option<uuid::Uuid>)> = sqlx::query_as(
        "SELECT delivery_id, verdict, rule, task_id FROM webhook_deliveries ORDER BY delivery_id COLLATE \"C\"",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let verdicts: Vec<(&str, &str, Option<&str>)> = rows
        .iter()
        .map(|(d, v, r, _)| (d.as_str(), v.as_str(), r.as_deref()))
        .collect();
    assert_eq!(
        verdicts,
        [
            ("d-closed", "no_match", None),
            ("d-issue", "task_created", Some("issue-opened-or-labeled")),
            ("d-push-feature", "no_match", None),
            ("d-push-main", "task_created", Some("push-default-branch")),
        ]
    );
    let tasks: Vec<(uuid::Uuid, String, String, String, String, Value, Vec<String>)> =
        sqlx::query_as(
            "SELECT id, title, repository, priority, submitted_by, metadata, tags FROM tasks ORDER BY title",
        )
        .fetch_all(&stack.pool)
        .await
        .unwrap();
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[0].1, "Build abc1234 on demo");
    assert_eq!(tasks[1].1, "Issue #42: Crash on start");
    assert_eq!(tasks[1].2, "demo");
    assert_eq!(tasks[1].3, "high");
    assert_eq!(tasks[1].4, "webhook:github");
    assert_eq!(tasks[1].5["action"], "triage");
    assert_eq!(tasks[1].6, ["github", "issue"]);
    for (id, ..) in &tasks {
        let linked = rows.iter().any(|r| r.3 == Some(*id));
        assert!(linked, "the delivery row points at its task");
        let audit = stack
            .count(&format!(
                "SELECT count(*) FROM task_audit_log WHERE task_id = '{id}' AND event = 'task_created'"
            ))
            .await;
        assert_eq!(audit, 1);
    }
    assert_eq!(
        stack
            .count("SELECT count(*) FROM webhook_audit_log WHERE event = 'webhook_received'")
            .await,
        4
    );
    // The body is kept verbatim.
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT body FROM webhook_deliveries WHERE delivery_id = 'd-issue'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(stored, issue("opened", 42, "Crash on start", "steps..."));
    stack.assert_drained(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn gitlab_and_standard_webhooks_deliveries_are_verified_and_routed() {
    let stack = TestStack::start(
        |s| {
            s.webhooks.sources.insert(
                "gitlab".into(),
                WebhookSource {
                    scheme: WebhookScheme::Gitlab,
                    secrets: vec![secret("gl-1", GL_TOKEN)],
                    body_limit_bytes: 1 << 20,
                    tolerance_secs: 300,
                    rules: vec![
                        WebhookRule {
                            actions: vec!["open".into()],
                            ..rule(
                                "gl-issue-open",
                                "Issue Hook",
                                template(
                                    "Issue #{object_attributes.iid}: {object_attributes.title}",
                                    "{project.path}",
                                ),
                            )
                        },
                        WebhookRule {
                            branches: vec!["$default".into()],
                            ..rule(
                                "gl-push-default",
                                "Push Hook",
                                template("Build {checkout_sha}", "{project.path}"),
                            )
                        },
                    ],
                },
            );
            s.webhooks.sources.insert(
                "billing".into(),
                standard_source(vec![rule(
                    "invoice-failed",
                    "invoice.failed",
                    template("Chase invoice {data.id}", "billing"),
                )]),
            );
        },
        1,
    )
    .await;
    stack.wait_pulling().await;
    let gl_issue = serde_json::to_vec(&json!({
        "object_kind": "issue", "event_type": "issue",
        "object_attributes": {"iid": 9, "title": "Broken pipeline", "action": "open"},
        "project": {"path": "demo", "default_branch": "main"}
    }))
    .unwrap();
    let gl_push = serde_json::to_vec(&json!({
        "object_kind": "push", "ref": "refs/heads/main", "checkout_sha": "feedbeef",
        "project": {"path": "demo", "default_branch": "main"}
    }))
    .unwrap();
    for (uuid, event, body) in [
        ("gl-uuid-1", "Issue Hook", gl_issue),
        ("gl-uuid-2", "Push Hook", gl_push),
    ] {
        let r = stack
            .http
            .post(format!("{}/v1/webhooks/gitlab", stack.base()))
            .header("X-Gitlab-Token", GL_TOKEN)
            .header("X-Gitlab-Event-UUID", uuid)
            .header("X-Gitlab-Event", event)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
    }
    let body = br#"{"type":"invoice.failed","data":{"id":"in_123"}}"#.to_vec();
    let ts = chrono::Utc::now().timestamp();
    let sig = standard_signature(STD_SECRET, "msg_1", ts, &body);
    let r = stack
        .http
        .post(format!("{}/v1/webhooks/billing", stack.base()))
        .header("webhook-id", "msg_1")
        .header("webhook-timestamp", ts.to_string())
        // Rotation-style list: an unknown signature first, ours second.
        .header(
            "webhook-signature",
            format!("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= {sig}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    stack
        .wait_count("SELECT count(*) FROM tasks", 3, Duration::from_secs(10))
        .await;
    let titles: Vec<(String, String, String)> =
        sqlx::query_as("SELECT title, repository, submitted_by FROM tasks ORDER BY title")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    assert_eq!(
        titles,
        [
            (
                "Build feedbeef".into(),
                "demo".into(),
                "webhook:gitlab".into()
            ),
            (
                "Chase invoice in_123".into(),
                "billing".into(),
                "webhook:billing".into()
            ),
            (
                "Issue #9: Broken pipeline".into(),
                "demo".into(),
                "webhook:gitlab".into()
            ),
        ]
    );
    let event: String =
        sqlx::query_scalar("SELECT event FROM webhook_deliveries WHERE source = 'billing'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(
        event, "invoice.failed",
        "Standard Webhooks: the event is the body's type"
    );
}

#[tokio::test]
async fn fifty_concurrent_copies_make_one_task_tampering_is_refused_and_replays_are_duplicates() {
    let stack = TestStack::start(with_github, 2).await;
    stack.wait_pulling().await;
    let body = issue("opened", 7, "Same delivery", "");
    let mut posts = Vec::new();
    for _ in 0..50 {
        let (stack, body) = (&stack, body.clone());
        posts.push(
            async move { post_github(stack, "github", "d-50", "issues", body, GH_SECRET).await },
        );
    }
    let answers = futures::future::join_all(posts).await;
    let mut duplicates = 0;
    for r in answers {
        assert_eq!(r.status(), 202);
        let b: Value = r.json().await.unwrap();
        duplicates += usize::from(b["duplicate"] == true);
    }
    // The first to reach the ledger front may still be marked duplicate if a copy reached
    // JetStream before it did; at most one answer is "new".
    assert!(duplicates >= 49, "{duplicates} duplicates");
    stack
        .wait_count("SELECT count(*) FROM tasks", 1, Duration::from_secs(10))
        .await;

    // Same id, different body: refused and audited; the first body stands.
    let tampered = issue("opened", 7, "Same delivery, new words", "");
    let r = post_github(
        &stack,
        "github",
        "d-50",
        "issues",
        tampered.clone(),
        GH_SECRET,
    )
    .await;
    assert_eq!(r.status(), 409);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["code"], "MHV-301");
    assert!(e["recovery"]
        .as_str()
        .unwrap()
        .contains("first body stands"));
    let audited = stack
        .wait_count(
            "SELECT count(*) FROM webhook_audit_log WHERE event = 'webhook_tampered' AND delivery_id = 'd-50'",
            1,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(audited, 1);

    // The same signed body under new delivery ids (GitHub signs only the body): duplicates,
    // answered from the ledger front without storing or publishing anything.
    let before = stream_last_seq(&stack).await;
    for i in 0..5 {
        let r = post_github(
            &stack,
            "github",
            &format!("d-50-replayed-{i}"),
            "issues",
            body.clone(),
            GH_SECRET,
        )
        .await;
        assert_eq!(r.status(), 202);
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["duplicate"], true);
    }
    assert_eq!(
        stream_last_seq(&stack).await,
        before,
        "replays published nothing"
    );
    stack.assert_drained(Duration::from_secs(10)).await;
    assert_eq!(stack.count("SELECT count(*) FROM tasks").await, 1);
    assert_eq!(
        stack.count("SELECT count(*) FROM webhook_deliveries").await,
        1
    );
    let first: Vec<u8> = sqlx::query_scalar("SELECT body FROM webhook_deliveries")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(first, body);
}

#[tokio::test]
async fn the_database_ledger_catches_tampering_the_kv_front_forgot() {
    let stack = TestStack::start(
        |s| {
            with_github(s);
            s.nats.stream.duplicate_window_secs = 1;
        },
        1,
    )
    .await;
    stack.wait_pulling().await;
    let body = issue("opened", 1, "Original", "");
    let r = post_github(&stack, "github", "d-1", "issues", body.clone(), GH_SECRET).await;
    assert_eq!(r.status(), 202);
    stack
        .wait_count("SELECT count(*) FROM tasks", 1, Duration::from_secs(10))
        .await;
    // The fast front forgets (as after its retention) and JetStream's duplicate window passes:
    // only PostgreSQL remembers the delivery now.
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let kv = js
        .get_key_value(&stack.settings.webhooks.ledger_bucket)
        .await
        .unwrap();
    kv.purge(mahavishnu::webhooks::delivery::kv_id_key("github", "d-1"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let changed = issue("opened", 1, "Rewritten", "");
    let r = post_github(
        &stack,
        "github",
        "d-1",
        "issues",
        changed.clone(),
        GH_SECRET,
    )
    .await;
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    let n = stack
        .wait_count(
            "SELECT count(*) FROM webhook_audit_log WHERE event = 'webhook_tampered'",
            1,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(n, 1, "the worker's ledger detected the different body");
    let detected_by: String = sqlx::query_scalar(
        "SELECT details->>'detected_by' FROM webhook_audit_log WHERE event = 'webhook_tampered'",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(detected_by, "worker");
    // Same for a GitHub replay: the front forgot the body, the ledger's body index did not.
    kv.purge(mahavishnu::webhooks::delivery::kv_body_key(
        "github",
        &mahavishnu::webhooks::delivery::sha256_hex(&body),
    ))
    .await
    .unwrap();
    let r = post_github(&stack, "github", "d-2", "issues", body.clone(), GH_SECRET).await;
    assert_eq!(r.status(), 202);
    let n = stack
        .wait_count(
            "SELECT count(*) FROM webhook_audit_log WHERE event = 'webhook_replayed' AND delivery_id = 'd-2'",
            1,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(n, 1, "the worker's ledger recognised the replayed body");
    stack.assert_drained(Duration::from_secs(5)).await;
    assert_eq!(stack.count("SELECT count(*) FROM tasks").await, 1);
    assert_eq!(
        stack.count("SELECT count(*) FROM webhook_deliveries").await,
        1
    );
    let title: String = sqlx::query_scalar("SELECT title FROM tasks")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(title, "Issue #1: Original");
}

#[tokio::test]
async fn rotation_either_secret_verifies_the_metric_names_it_and_expiry_ends_the_old_one() {
    let expiry = chrono::Utc::now() + chrono::Duration::seconds(4);
    let stack = TestStack::start(
        |s| {
            let mut old = secret("2026-10", GH_SECRET);
            old.expires_at = Some(expiry);
            s.webhooks.sources.insert(
                "github".into(),
                github_source(vec![old, secret("2026-11", GH_SECRET_NEW)]),
            );
        },
        1,
    )
    .await;
    let r = post_github(
        &stack,
        "github",
        "r-old",
        "ping",
        br#"{"r":1}"#.to_vec(),
        GH_SECRET,
    )
    .await;
    assert_eq!(r.status(), 202, "old secret before expiry");
    for i in 0..2 {
        let r = post_github(
            &stack,
            "github",
            &format!("r-new-{i}"),
            "ping",
            format!("{{\"n\":{i}}}").into_bytes(),
            GH_SECRET_NEW,
        )
        .await;
        assert_eq!(r.status(), 202, "new secret");
    }
    let m = gateway_metrics(&stack).await;
    let verified = |id| {
        sample(
            &m,
            "mhv_webhook_verified_total",
            &[("source", "github"), ("secret_id", id)],
        )
    };
    assert_eq!(verified("2026-10"), Some(1.0), "{m}");
    assert_eq!(verified("2026-11"), Some(2.0), "{m}");
    assert!(!m.contains(GH_SECRET) && !m.contains(GH_SECRET_NEW));

    let wait = (expiry - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(200)).await;
    let r = post_github(
        &stack,
        "github",
        "r-old-late",
        "ping",
        br#"{"r":2}"#.to_vec(),
        GH_SECRET,
    )
    .await;
    assert_eq!(
        r.status(),
        401,
        "the old secret stopped passing at its expiry"
    );
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["code"], "MHV-300");
    let r = post_github(
        &stack,
        "github",
        "r-new-late",
        "ping",
        br#"{"r":3}"#.to_vec(),
        GH_SECRET_NEW,
    )
    .await;
    assert_eq!(r.status(), 202);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["duplicate"], false, "a new body, not a replay");
}

#[tokio::test]
async fn a_10_mb_payload_is_claim_checked_and_processed_end_to_end() {
    let stack = TestStack::start(with_github, 1).await;
    stack.wait_pulling().await;
    let big = "x".repeat(10 * 1024 * 1024);
    let body = issue("opened", 10, "Huge issue", &big);
    assert!(body.len() > 10 * 1024 * 1024);
    let r = post_github(&stack, "github", "d-big", "issues", body.clone(), GH_SECRET).await;
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    let n = stack
        .wait_count(
            "SELECT count(*) FROM tasks WHERE title = 'Issue #10: Huge issue'",
            1,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(n, 1);
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT body FROM webhook_deliveries WHERE delivery_id = 'd-big'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert!(stored == body, "the 10 MB body is stored verbatim");
    let m = gateway_metrics(&stack).await;
    assert_eq!(
        sample(
            &m,
            "mhv_webhook_claim_checked_total",
            &[("source", "github")]
        ),
        Some(1.0),
        "{m}"
    );
    stack.assert_drained(Duration::from_secs(10)).await;
    // The worker deletes the claim-checked copy after its commit.
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let store = js
        .get_object_store(&stack.settings.webhooks.body_bucket)
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        let mut list = store.list().await.unwrap();
        let mut live = 0;
        while let Some(o) = list.next().await {
            if !o.unwrap().deleted {
                live += 1;
            }
        }
        if live == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "claim-checked body not deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a request's head over raw TCP and returns the status line the gateway answers with,
/// while `body` keeps feeding bytes (possibly forever) from another task.
async fn status_while_sending(
    addr: std::net::SocketAddr,
    head: String,
    chunked_forever: bool,
) -> (String, u64) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (read, mut write) = stream.into_split();
    write.write_all(head.as_bytes()).await.unwrap();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = sent.clone();
    let feeder = tokio::spawn(async move {
        if !chunked_forever {
            return;
        }
        let chunk = vec![b'a'; 64 * 1024];
        let framed = [
            format!("{:x}\r\n", chunk.len()).into_bytes(),
            chunk,
            b"\r\n".to_vec(),
        ]
        .concat();
        while write.write_all(&framed).await.is_ok() {
            counter.fetch_add(64 * 1024, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(read).read_line(&mut line),
    )
    .await
    .expect("the gateway answered while the body was still coming")
    .unwrap();
    feeder.abort();
    (line, sent.load(std::sync::atomic::Ordering::Relaxed))
}

#[tokio::test]
async fn oversized_bodies_are_refused_without_being_read_whole() {
    let stack = TestStack::start(
        |s| {
            let mut small = github_source(vec![secret("gh-1", GH_SECRET)]);
            small.body_limit_bytes = 64 * 1024;
            s.webhooks.sources.insert("small".into(), small);
        },
        0,
    )
    .await;
    let addr = stack.gateway.as_ref().unwrap().addr;
    let head = |extra: &str| {
        format!(
            "POST /v1/webhooks/small HTTP/1.1\r\nHost: x\r\nX-GitHub-Delivery: d\r\nX-GitHub-Event: push\r\nX-Hub-Signature-256: sha256=00\r\n{extra}\r\n"
        )
    };
    // Declared too large: refused before a single body byte is sent.
    let (line, _) = status_while_sending(addr, head("Content-Length: 30000000\r\n"), false).await;
    assert!(line.starts_with("HTTP/1.1 413"), "{line}");
    // Chunked and endless: refused once the limit is crossed, not after the end (there is none).
    let (line, sent) =
        status_while_sending(addr, head("Transfer-Encoding: chunked\r\n"), true).await;
    assert!(line.starts_with("HTTP/1.1 413"), "{line}");
    // `sent` counts bytes handed to the kernel, which buffers several MiB on loopback; the point
    // is that an endless body was answered at all, so it was never buffered whole.
    assert!(sent < 32 * 1024 * 1024, "answered after {sent} bytes");
    let m = gateway_metrics(&stack).await;
    assert_eq!(
        sample(
            &m,
            "mhv_webhook_deliveries_total",
            &[("source", "small"), ("outcome", "too_large")]
        ),
        Some(2.0),
        "{m}"
    );
}

#[tokio::test]
async fn the_memory_budget_sheds_load_before_reading_and_frees_on_disconnect() {
    let stack = TestStack::start(
        |s| {
            let mut small = github_source(vec![secret("gh-1", GH_SECRET)]);
            small.body_limit_bytes = 32 * 1024;
            s.webhooks.sources.insert("small".into(), small);
            s.gateway.webhook_max_buffered_bytes = 48 * 1024;
        },
        1,
    )
    .await;
    stack.wait_pulling().await;
    // A slow sender: headers and 1 KiB of a chunked body, then nothing.
    use tokio::io::AsyncWriteExt as _;
    let mut slow = tokio::net::TcpStream::connect(stack.gateway.as_ref().unwrap().addr)
        .await
        .unwrap();
    slow.write_all(
        format!(
            "POST /v1/webhooks/small HTTP/1.1\r\nHost: x\r\nX-GitHub-Delivery: slow\r\nX-GitHub-Event: push\r\nX-Hub-Signature-256: sha256={}\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n{}\r\n",
            "0".repeat(64),
            "a".repeat(1024)
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // It holds one reservation (here the whole 32 KiB limit); a second body does not fit the rest.
    let body = br#"{"n":1}"#.to_vec();
    let r = post_github(&stack, "small", "d-1", "ping", body.clone(), GH_SECRET).await;
    assert_eq!(r.status(), 503);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["code"], "MHV-013");
    // The slow sender goes away: its reservation is released and the retry is accepted.
    drop(slow);
    let start = Instant::now();
    loop {
        let r = post_github(&stack, "small", "d-1", "ping", body.clone(), GH_SECRET).await;
        if r.status() == 202 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "budget never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = gateway_metrics(&stack).await;
    assert!(
        sample(
            &m,
            "mhv_webhook_deliveries_total",
            &[("source", "small"), ("outcome", "overloaded")]
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );
}

#[tokio::test]
async fn a_dead_lettered_delivery_is_accepted_again_when_its_sender_redelivers_it() {
    let mut stack = TestStack::start(
        |s| {
            with_github(s);
            // Small messages, so a 50 KB body is claim-checked.
            s.gateway.body_limit_bytes = 8 * 1024;
            s.nats.stream.max_message_bytes = 16 * 1024;
        },
        0,
    )
    .await;
    let body = issue("opened", 9, "Claim-checked", &"y".repeat(50_000));
    let r = post_github(
        &stack,
        "github",
        "d-lost-body",
        "issues",
        body.clone(),
        GH_SECRET,
    )
    .await;
    assert_eq!(r.status(), 202);
    // The stored body disappears before any worker runs (as after claim_check_max_age_hours).
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let store = js
        .get_object_store(&stack.settings.webhooks.body_bucket)
        .await
        .unwrap();
    let mut names = Vec::new();
    let mut list = store.list().await.unwrap();
    while let Some(o) = list.next().await {
        names.push(o.unwrap().name);
    }
    assert_eq!(names.len(), 1, "the body was claim-checked");
    store.delete(&names[0]).await.unwrap();
    stack.spawn_worker();
    let n = stack
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE error_code = 'MHV-014'",
            1,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(n, 1, "dead-lettered as MHV-014");
    // After the dead letter's commit, the worker clears the delivery from the ledger front.
    let kv = js
        .get_key_value(&stack.settings.webhooks.ledger_bucket)
        .await
        .unwrap();
    let id_key = mahavishnu::webhooks::delivery::kv_id_key("github", "d-lost-body");
    let start = Instant::now();
    while kv.get(&id_key).await.unwrap().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the front kept the dead-lettered delivery"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The sender redelivers (same id, same body, well inside JetStream's duplicate window):
    // accepted as new and processed, not answered "duplicate" and dropped.
    let r = post_github(&stack, "github", "d-lost-body", "issues", body, GH_SECRET).await;
    assert_eq!(r.status(), 202);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["duplicate"], false);
    assert_eq!(
        stack
            .wait_count("SELECT count(*) FROM tasks", 1, Duration::from_secs(10))
            .await,
        1
    );
    stack.assert_drained(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn lost_webhook_buckets_are_recreated_by_the_gateway() {
    let stack = TestStack::start(with_github, 1).await;
    stack.wait_pulling().await;
    let js = async_nats::jetstream::new(stack.nats_client().await);
    js.delete_key_value(&stack.settings.webhooks.ledger_bucket)
        .await
        .unwrap();
    js.delete_object_store(&stack.settings.webhooks.body_bucket)
        .await
        .unwrap();
    // Until the gateway notices, deliveries are refused with 503 (never a 2xx it cannot keep).
    let start = Instant::now();
    let mut refused = 0;
    loop {
        let body = issue("opened", 5, "After the loss", "");
        let r = post_github(&stack, "github", "d-lost", "issues", body, GH_SECRET).await;
        if r.status() == 202 {
            break;
        }
        assert_eq!(r.status(), 503, "{:?}", r.text().await);
        refused += 1;
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "buckets never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused > 0, "the first delivery found the bucket gone");
    assert_eq!(
        stack
            .wait_count("SELECT count(*) FROM tasks", 1, Duration::from_secs(10))
            .await,
        1
    );
}

#[tokio::test]
async fn refusals_carry_their_codes_and_leave_nothing_behind() {
    let stack = TestStack::start(
        |s| {
            with_github(s);
            s.webhooks
                .sources
                .insert("billing".into(), standard_source(vec![]));
        },
        1,
    )
    .await;
    stack.wait_pulling().await;
    let code = |v: Value| v["code"].as_str().unwrap().to_owned();
    // Unknown source.
    let r = post_github(&stack, "nope", "d", "issues", b"{}".to_vec(), GH_SECRET).await;
    assert_eq!(r.status(), 404);
    assert_eq!(code(r.json().await.unwrap()), "MHV-305");
    // Wrong secret.
    let r = post_github(&stack, "github", "d", "issues", b"{}".to_vec(), "wrong").await;
    assert_eq!(r.status(), 401);
    assert_eq!(code(r.json().await.unwrap()), "MHV-300");
    // Missing signature.
    let r = stack
        .http
        .post(format!("{}/v1/webhooks/github", stack.base()))
        .header("X-GitHub-Delivery", "d")
        .header("X-GitHub-Event", "issues")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(code(r.json().await.unwrap()), "MHV-300");
    // Signed, but no delivery id.
    let r = stack
        .http
        .post(format!("{}/v1/webhooks/github", stack.base()))
        .header("X-GitHub-Event", "issues")
        .header("X-Hub-Signature-256", github_signature(GH_SECRET, b"{}"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(code(e.clone()), "MHV-306");
    assert!(e["message"].as_str().unwrap().contains("X-GitHub-Delivery"));
    // Standard Webhooks: correctly signed, but 310 s old and 310 s ahead (the exact bounds are
    // unit-tested; here a second may pass between signing and checking).
    for skew in [-310, 310] {
        let ts = chrono::Utc::now().timestamp() + skew;
        let body = br#"{"type":"x"}"#;
        let r = stack
            .http
            .post(format!("{}/v1/webhooks/billing", stack.base()))
            .header("webhook-id", "msg_old")
            .header("webhook-timestamp", ts.to_string())
            .header(
                "webhook-signature",
                standard_signature(STD_SECRET, "msg_old", ts, body),
            )
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(code(r.json().await.unwrap()), "MHV-304");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stack.count("SELECT count(*) FROM webhook_deliveries").await,
        0
    );
    assert_eq!(stream_last_seq(&stack).await, 0, "nothing was published");
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let kv = js
        .get_key_value(&stack.settings.webhooks.ledger_bucket)
        .await
        .unwrap();
    assert!(
        kv.keys().await.unwrap().next().await.is_none(),
        "refused deliveries leave nothing in the ledger front"
    );
}

#[tokio::test]
async fn a_payload_with_nul_is_kept_verbatim_and_never_retried_forever() {
    let stack = TestStack::start(
        |s| {
            with_github(s);
            s.webhooks
                .sources
                .insert("billing".into(), standard_source(vec![]));
        },
        1,
    )
    .await;
    stack.wait_pulling().await;
    // JSON \u0000 in the title (jsonb would refuse it), and a raw NUL byte in a second body.
    let with_escape = issue("opened", 3, "nul\u{0}inside", "body\u{0}");
    let r = post_github(
        &stack,
        "github",
        "d-nul",
        "issues",
        with_escape.clone(),
        GH_SECRET,
    )
    .await;
    assert_eq!(r.status(), 202);
    let raw_nul = b"{\"action\":\"opened\"}\0garbage".to_vec();
    let r = post_github(
        &stack,
        "github",
        "d-raw-nul",
        "issues",
        raw_nul.clone(),
        GH_SECRET,
    )
    .await;
    assert_eq!(r.status(), 202);
    // Standard Webhooks: the event name comes from the body, here with a NUL in it.
    let typed = br#"{"type":"invoice.\u0000paid","data":{}}"#.to_vec();
    let ts = chrono::Utc::now().timestamp();
    let r = stack
        .http
        .post(format!("{}/v1/webhooks/billing", stack.base()))
        .header("webhook-id", "msg_nul")
        .header("webhook-timestamp", ts.to_string())
        .header(
            "webhook-signature",
            standard_signature(STD_SECRET, "msg_nul", ts, &typed),
        )
        .body(typed.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    stack
        .wait_count(
            "SELECT count(*) FROM webhook_deliveries",
            3,
            Duration::from_secs(10),
        )
        .await;
    stack.assert_drained(Duration::from_secs(5)).await;
    let rows: Vec<(String, Vec<u8>, String)> = sqlx::query_as(
        "SELECT delivery_id, body, verdict FROM webhook_deliveries ORDER BY delivery_id COLLATE \"C\"",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(
        rows[0],
        ("d-nul".into(), with_escape, "task_created".into())
    );
    assert_eq!(rows[1], ("d-raw-nul".into(), raw_nul, "invalid".into()));
    assert_eq!(rows[2], ("msg_nul".into(), typed, "no_match".into()));
    let event: String =
        sqlx::query_scalar("SELECT event FROM webhook_deliveries WHERE delivery_id = 'msg_nul'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(
        event, "invoice.paid",
        "control characters removed from the event name"
    );
    let title: String = sqlx::query_scalar("SELECT title FROM tasks")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(
        title, "Issue #3: nulinside",
        "NUL removed from the title only"
    );
    assert_eq!(stack.count("SELECT count(*) FROM dead_letters").await, 0);
}

#[tokio::test]
async fn forced_redelivery_makes_one_task_per_request_and_is_audited() {
    let stack = TestStack::start(
        |s| {
            with_github(s);
            // The first rule set routes nothing for `ping`; redelivery uses the same rules,
            // so route pings through a rule only the redelivery test needs.
            s.webhooks
                .sources
                .get_mut("github")
                .unwrap()
                .rules
                .push(rule("ping", "ping", template("Ping {zen}", "demo")));
        },
        1,
    )
    .await;
    stack.wait_pulling().await;
    let body = br#"{"zen":"Keep it logically awesome."}"#.to_vec();
    let r = post_github(&stack, "github", "d-ping", "ping", body, GH_SECRET).await;
    assert_eq!(r.status(), 202);
    stack
        .wait_count("SELECT count(*) FROM tasks", 1, Duration::from_secs(10))
        .await;
    let config = stack.settings_file();
    // Async: the in-process worker shares this test's runtime and must keep running.
    let mhv = |args: &[&str]| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_mhv"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("MHV_DATABASE__URL", &stack.db.url)
            .env("RUST_LOG", "warn")
            .output()
    };
    let refused = mhv(&["webhooks", "redeliver", "github", "d-ping"])
        .await
        .unwrap();
    assert!(!refused.status.success(), "--force is required");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    for _ in 0..2 {
        let out = mhv(&[
            "webhooks",
            "redeliver",
            "github",
            "d-ping",
            "--force",
            "--reason",
            "rule fixed",
        ])
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("verdict task_created"), "{stdout}");
    }
    // Each forced redelivery is one new task and one audit row; the original stays.
    assert_eq!(stack.count("SELECT count(*) FROM tasks").await, 3);
    let audits: Vec<(String, Value)> = sqlx::query_as(
        "SELECT actor, details FROM webhook_audit_log WHERE event = 'webhook_redelivered'",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(audits.len(), 2);
    assert!(audits[0].0.starts_with("cli:"));
    assert_eq!(audits[0].1["reason"], "rule fixed");
    let list = mhv(&["webhooks", "deliveries"]).await.unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("d-ping") && text.contains("webhook_redelivered"),
        "{text}"
    );
    let sources = mhv(&["webhooks", "list"]).await.unwrap();
    let text = String::from_utf8_lossy(&sources.stdout);
    assert!(
        text.contains("POST /v1/webhooks/github") && text.contains("gh-1"),
        "{text}"
    );
    assert!(!text.contains(GH_SECRET));
    // A stored delivery that does not exist is refused with a code.
    let missing = mhv(&["webhooks", "redeliver", "github", "nope", "--force"])
        .await
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("MHV-100"));
}
