//! Task execution on a real git repository the test creates, with real nats-server, PostgreSQL
//! and worker processes: success, retries with growing delays, dead letters, timeouts that kill
//! the whole process tree, takeover after SIGKILL, SIGSTOP past the ack wait, cancellation,
//! dead-letter replay, and a fleet-wide per-repository limit.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use mahavishnu::config::Settings;
use mahavishnu::registry::{Action, Gate, Repository};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use uuid::Uuid;

fn git(dir: &Path, args: &[&str]) {
    let st = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .output()
        .unwrap();
    assert!(st.status.success(), "git {args:?}: {st:?}");
}

/// A git repository with one commit on `main`.
fn make_repo(root: &Path) -> PathBuf {
    let repo = root.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("README.md"), "the readme\n").unwrap();
    git(&repo, &["add", "README.md"]);
    git(&repo, &["commit", "-qm", "init"]);
    repo
}

fn sh(script: &str, timeout_secs: u64, max_attempts: u32, retryable: &[i32]) -> Action {
    Action {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        timeout_secs,
        max_attempts,
        retryable_exit_codes: retryable.to_vec(),
        env: vec!["PATH".into()],
        gates: None,
    }
}

struct Repo {
    name: &'static str,
    limit: u32,
    actions: Vec<(&'static str, Action)>,
    gates: Vec<(&'static str, &'static str)>,
}

fn configure(s: &mut Settings, path: &Path, worktrees: &Path, repos: Vec<Repo>) {
    s.execution.worktree_root = worktrees.to_string_lossy().into_owned();
    s.execution.ack_wait_secs = 3;
    s.execution.retry_delay_ms = 300;
    s.execution.retry_max_delay_ms = 5_000;
    s.execution.kill_grace_ms = 300;
    s.execution.slot_wait_ms = 200;
    s.database.max_connections = 12;
    for r in repos {
        s.repositories.insert(
            r.name.into(),
            Repository {
                path: path.to_string_lossy().into_owned(),
                default_branch: "main".into(),
                default_action: None,
                max_concurrent: r.limit,
                actions: r
                    .actions
                    .into_iter()
                    .map(|(n, a)| (n.to_owned(), a))
                    .collect(),
                gates: r
                    .gates
                    .into_iter()
                    .map(|(n, script)| {
                        (
                            n.to_owned(),
                            Gate {
                                argv: vec!["sh".into(), "-c".into(), script.into()],
                                timeout_secs: 30,
                                env: vec!["PATH".into()],
                            },
                        )
                    })
                    .collect::<BTreeMap<_, _>>(),
            },
        );
    }
}

/// A stack whose registry holds `repos`, all backed by one git repository made in `tmp` (its
/// worktrees under `tmp/worktrees`), with `workers` in-process workers.
async fn exec_stack(tmp: &Path, repos: Vec<Repo>, workers: usize) -> (TestStack, PathBuf) {
    let repo = make_repo(tmp);
    let wt = tmp.join("worktrees");
    let stack = TestStack::start(|s| configure(s, &repo, &wt, repos), workers).await;
    (stack, repo)
}

/// Repository `app` with a fleet-wide limit and no gates.
fn limited(limit: u32, actions: Vec<(&'static str, Action)>) -> Vec<Repo> {
    vec![Repo {
        name: "app",
        limit,
        actions,
        gates: vec![],
    }]
}

fn one(actions: Vec<(&'static str, Action)>) -> Vec<Repo> {
    limited(0, actions)
}

async fn submit(stack: &TestStack, repository: &str, action: &str) -> Uuid {
    let r = stack
        .create(
            &json!({"title": format!("run {action}"), "repository": repository, "metadata": {"action": action}}),
            None,
        )
        .await;
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    Uuid::parse_str(body["id"].as_str().unwrap()).unwrap()
}

async fn status(stack: &TestStack, id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_optional(&stack.pool)
        .await
        .unwrap()
}

async fn wait_status(stack: &TestStack, id: Uuid, want: &str, timeout: Duration) {
    let start = Instant::now();
    loop {
        let s = status(stack, id).await;
        if s.as_deref() == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "task {id} is {s:?}, not {want}, after {timeout:?}; runs: {:?}",
            runs(stack, id).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug, sqlx::FromRow)]
struct Run {
    attempt: i32,
    state: String,
    worker_id: String,
    exit_code: Option<i32>,
    duration_ms: Option<i64>,
    stdout_tail: Option<String>,
    stderr_tail: Option<String>,
    worktree: Option<String>,
    error_code: Option<String>,
    started_at: chrono::DateTime<chrono::Utc>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

async fn runs(stack: &TestStack, id: Uuid) -> Vec<Run> {
    sqlx::query_as(
        "SELECT attempt, state, worker_id, exit_code, duration_ms, stdout_tail, stderr_tail, worktree,
                error_code, started_at, finished_at
         FROM task_runs WHERE task_id = $1 ORDER BY attempt",
    )
    .bind(id)
    .fetch_all(&stack.pool)
    .await
    .unwrap()
}

async fn events(stack: &TestStack, id: Uuid) -> Vec<(String, Value)> {
    sqlx::query_as("SELECT event, details FROM task_audit_log WHERE task_id = $1 ORDER BY id")
        .bind(id)
        .fetch_all(&stack.pool)
        .await
        .unwrap()
}

async fn saga(stack: &TestStack, id: Uuid) -> Vec<(i32, String, String, String, Value)> {
    sqlx::query_as(
        "SELECT attempt, step, state, worker_id, details FROM saga_log WHERE task_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(&stack.pool)
    .await
    .unwrap()
}

/// Waits until attempt `attempt`'s command runs; returns its process group id.
async fn wait_command_started(stack: &TestStack, id: Uuid, attempt: i32) -> i32 {
    let start = Instant::now();
    loop {
        let d: Option<Value> = sqlx::query_scalar(
            "SELECT details FROM saga_log WHERE task_id = $1 AND attempt = $2 AND step = 'command' AND state = 'started'",
        )
        .bind(id)
        .bind(attempt)
        .fetch_optional(&stack.pool)
        .await
        .unwrap();
        if let Some(d) = d {
            return i32::try_from(d["pgid"].as_i64().unwrap()).unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "attempt {attempt} never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True while `pid` runs (a zombie runs nothing).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 1..]
                .split_whitespace()
                .next()
                .unwrap_or("Z")
                .to_owned();
            state != "Z" && state != "X"
        }
    }
}

fn pids(file: &Path) -> Vec<i32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn exec_stream_messages(stack: &TestStack) -> u64 {
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let mut s = js
        .get_stream(&stack.settings.execution.stream)
        .await
        .unwrap();
    s.info().await.unwrap().state.messages
}

async fn wait_exec_drained(stack: &TestStack) {
    let start = Instant::now();
    while exec_stream_messages(stack).await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "execution requests left in the stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_successful_action_completes_with_its_output_recorded_and_its_worktree_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let script = "echo hello from $MHV_TASK_ID attempt $MHV_ATTEMPT; cat README.md; echo careful >&2; touch made-here";
    let repos = vec![Repo {
        name: "app",
        limit: 0,
        actions: vec![("ok", sh(script, 30, 3, &[]))],
        gates: vec![("readme", "test -f README.md && test -f made-here")],
    }];
    let (stack, repo) = exec_stack(tmp.path(), repos, 1).await;
    let id = submit(&stack, "app", "ok").await;
    wait_status(&stack, id, "completed", Duration::from_secs(30)).await;

    let r = runs(&stack, id).await;
    assert_eq!(r.len(), 1, "{r:?}");
    let run = &r[0];
    assert_eq!((run.state.as_str(), run.exit_code), ("succeeded", Some(0)));
    let out = run.stdout_tail.as_deref().unwrap();
    assert!(out.contains(&format!("hello from {id} attempt 1")), "{out}");
    assert!(out.contains("the readme"), "{out}");
    assert!(run.stderr_tail.as_deref().unwrap().contains("careful"));
    assert!(run.duration_ms.is_some());
    // The same over HTTP.
    let api = stack.get(&format!("/v1/tasks/{id}/runs")).await;
    assert_eq!(api.status(), 200);
    let api: Value = api.json().await.unwrap();
    assert_eq!(api.as_array().unwrap().len(), 1, "{api}");
    assert_eq!(api[0]["state"], "succeeded");
    assert_eq!(api[0]["exit_code"], 0);
    assert!(api[0]["stdout_tail"]
        .as_str()
        .unwrap()
        .contains("hello from"));
    let missing = stack
        .get(&format!("/v1/tasks/{}/runs", Uuid::new_v4()))
        .await;
    assert_eq!(missing.status(), 404);
    // The worktree is gone, from disk and from git's list.
    let path = run.worktree.clone().unwrap();
    assert!(
        path.starts_with(&*tmp.path().join("worktrees").to_string_lossy()),
        "{path}"
    );
    assert!(!Path::new(&path).exists(), "worktree {path} left behind");
    let list = std::process::Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["worktree", "list", "--porcelain"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert_eq!(list.matches("worktree ").count(), 1, "{list}");

    let ev: Vec<String> = events(&stack, id).await.into_iter().map(|e| e.0).collect();
    assert_eq!(
        ev,
        [
            "task_created",
            "task_started",
            "worktree_created",
            "quality_gate_passed",
            "worktree_removed",
            "task_completed"
        ]
    );
    let steps: Vec<(String, String)> = saga(&stack, id)
        .await
        .into_iter()
        .map(|s| (s.1, s.2))
        .collect();
    let steps: Vec<(&str, &str)> = steps
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            ("attempt", "started"),
            ("worktree", "started"),
            ("worktree", "succeeded"),
            ("command", "started"),
            ("command", "succeeded"),
            ("gate:readme", "succeeded"),
            ("cleanup", "succeeded"),
            ("attempt", "succeeded"),
        ]
    );
    wait_exec_drained(&stack).await;
    // Nothing more happens to it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(runs(&stack, id).await.len(), 1);
}

#[tokio::test]
async fn a_failing_action_is_retried_with_growing_delays_then_dead_lettered() {
    let tmp = tempfile::tempdir().unwrap();
    let (stack, _) = exec_stack(
        tmp.path(),
        one(vec![
            ("flaky", sh("echo boom >&2; exit 3", 30, 4, &[3])),
            ("broken", sh("echo nope >&2; exit 2", 30, 4, &[3])),
        ]),
        1,
    )
    .await;
    let flaky = submit(&stack, "app", "flaky").await;
    let broken = submit(&stack, "app", "broken").await;
    wait_status(&stack, flaky, "failed", Duration::from_secs(40)).await;
    wait_status(&stack, broken, "failed", Duration::from_secs(10)).await;

    // Retryable exit: four attempts, further and further apart.
    let r = runs(&stack, flaky).await;
    assert_eq!(r.len(), 4, "{r:?}");
    assert_eq!(
        r.iter().map(|x| x.attempt).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(r
        .iter()
        .all(|x| x.state == "failed" && x.exit_code == Some(3)));
    assert!(r[0].stderr_tail.as_deref().unwrap().contains("boom"));
    let gaps: Vec<i64> = r
        .windows(2)
        .map(|w| (w[1].started_at - w[0].finished_at.unwrap()).num_milliseconds())
        .collect();
    assert!(gaps[0] >= 250, "first retry too soon: {gaps:?}");
    assert!(
        gaps.windows(2).all(|g| g[1] > g[0]),
        "delays do not grow: {gaps:?}"
    );
    let requeued: Vec<Value> = events(&stack, flaky)
        .await
        .into_iter()
        .filter(|e| e.0 == "task_requeued")
        .map(|e| e.1)
        .collect();
    assert_eq!(requeued.len(), 3);
    assert!(requeued.iter().all(|d| d["retry_in_ms"].as_u64().is_some()));

    let dl: Vec<(String, String, Option<Uuid>)> =
        sqlx::query_as("SELECT error_code, reason, task_id FROM dead_letters WHERE task_id = $1")
            .bind(flaky)
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    assert_eq!(dl.len(), 1, "{dl:?}");
    assert_eq!(dl[0].0, "MHV-204");
    assert!(
        dl[0].1.contains("exited with 3") && dl[0].1.contains("no attempts left"),
        "{}",
        dl[0].1
    );

    // Non-retryable exit: one attempt, failed at once, dead-lettered.
    let r = runs(&stack, broken).await;
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].error_code.as_deref(), Some("MHV-204"));
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dead_letters WHERE task_id = $1 AND error_code = 'MHV-204'",
    )
    .bind(broken)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(n, 1);
    wait_exec_drained(&stack).await;
    // Every attempt's worktree was removed, after failures too.
    let left = std::fs::read_dir(tmp.path().join("worktrees/app"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "worktrees left behind");
}

#[tokio::test]
async fn a_hanging_action_is_killed_with_its_children_at_its_timeout_and_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let pid_file = tmp.path().join("pids");
    let script = format!(
        "sleep 300 & echo $! >> {p}; sleep 300 & echo $! >> {p}; echo $$ >> {p}; wait",
        p = pid_file.display()
    );
    let (stack, _) = exec_stack(tmp.path(), one(vec![("hang", sh(&script, 1, 2, &[]))]), 1).await;
    let id = submit(&stack, "app", "hang").await;
    wait_status(&stack, id, "failed", Duration::from_secs(30)).await;

    let r = runs(&stack, id).await;
    assert_eq!(r.len(), 2, "retried once: {r:?}");
    for run in &r {
        assert_eq!(run.state, "timed_out");
        let ms = run.duration_ms.unwrap();
        assert!((1_000..3_000).contains(&ms), "killed after {ms} ms");
    }
    let dl: String = sqlx::query_scalar("SELECT error_code FROM dead_letters WHERE task_id = $1")
        .bind(id)
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(dl, "MHV-205");
    // Both attempts' shells and their background children are gone.
    let p = pids(&pid_file);
    assert_eq!(p.len(), 6, "{p:?}");
    let still: Vec<i32> = p.iter().copied().filter(|p| alive(*p)).collect();
    assert!(still.is_empty(), "still running: {still:?}");
}

#[tokio::test]
async fn a_worker_killed_mid_run_is_taken_over_and_the_task_completes_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let effects = tmp.path().join("effects");
    let script = format!("sleep 4; echo done $MHV_ATTEMPT >> {}", effects.display());
    let (mut stack, _) =
        exec_stack(tmp.path(), one(vec![("slow", sh(&script, 60, 3, &[]))]), 0).await;
    let mut a = stack.spawn_worker_process();
    let id = submit(&stack, "app", "slow").await;
    let pgid = wait_command_started(&stack, id, 1).await;
    let stale = runs(&stack, id).await[0].worktree.clone().unwrap();
    assert!(Path::new(&stale).exists());
    a.kill().unwrap();
    a.wait().unwrap();
    // Its command outlives it: it is in its own process group.
    assert!(mahavishnu_workers::exec::process::group_alive(pgid));

    stack.spawn_worker();
    wait_status(&stack, id, "completed", Duration::from_secs(30)).await;

    let r = runs(&stack, id).await;
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0].state, "abandoned");
    assert_eq!(r[1].state, "succeeded");
    assert_ne!(r[0].worker_id, r[1].worker_id);
    let takeover: Vec<Value> = saga(&stack, id)
        .await
        .into_iter()
        .filter(|s| s.1 == "takeover")
        .map(|s| {
            assert_eq!((s.0, s.2.as_str()), (1, "compensated"));
            s.4
        })
        .collect();
    assert_eq!(takeover.len(), 1);
    assert_eq!(takeover[0]["previous_worker"], json!(r[0].worker_id));
    assert_eq!(takeover[0]["killed_process_group"], json!(pgid));
    assert_eq!(takeover[0]["worktree_removed"], json!(true));
    assert!(!Path::new(&stale).exists(), "stale worktree left behind");
    // The orphaned command was killed before it could finish: one effect, from attempt 2.
    assert!(!mahavishnu_workers::exec::process::group_alive(pgid));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(lines(&effects), ["done 2"]);
    let completed = events(&stack, id)
        .await
        .iter()
        .filter(|e| e.0 == "task_completed")
        .count();
    assert_eq!(completed, 1);
    wait_exec_drained(&stack).await;
}

#[tokio::test]
async fn a_worker_paused_past_the_ack_wait_neither_completes_twice_nor_loses_the_task() {
    let tmp = tempfile::tempdir().unwrap();
    let effects = tmp.path().join("effects");
    let script = format!("sleep 5; echo done $MHV_ATTEMPT >> {}", effects.display());
    let (mut stack, _) =
        exec_stack(tmp.path(), one(vec![("slow", sh(&script, 60, 3, &[]))]), 0).await;
    let a = stack.spawn_worker_process();
    let id = submit(&stack, "app", "slow").await;
    wait_command_started(&stack, id, 1).await;
    let signal = |sig: &str| {
        let st = std::process::Command::new("kill")
            .args([sig, &a.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    signal("-STOP");
    stack.spawn_worker();
    // Past the ack wait (3 s), twice: the request is redelivered to the other worker, which
    // finds the task's lock held and leaves it.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let info = js
        .get_stream(&stack.settings.execution.stream)
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
            &stack.settings.execution.consumer,
        )
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert!(info.num_redelivered >= 1, "never redelivered: {info:?}");
    assert_eq!(status(&stack, id).await.as_deref(), Some("running"));
    assert_eq!(runs(&stack, id).await.len(), 1, "a second attempt started");
    signal("-CONT");

    wait_status(&stack, id, "completed", Duration::from_secs(30)).await;
    // Give a stray second run every chance to show up.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = runs(&stack, id).await;
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].state, "succeeded");
    assert_eq!(lines(&effects), ["done 1"]);
    assert!(saga(&stack, id).await.iter().all(|s| s.1 != "takeover"));
    let completed = events(&stack, id)
        .await
        .iter()
        .filter(|e| e.0 == "task_completed")
        .count();
    assert_eq!(completed, 1);
    wait_exec_drained(&stack).await;
    drop(a);
}

#[tokio::test]
async fn cancelling_a_running_task_kills_its_tree_within_two_seconds_and_a_queued_one_never_starts()
{
    let tmp = tempfile::tempdir().unwrap();
    let pid_file = tmp.path().join("pids");
    let script = format!(
        "trap '' TERM; sleep 300 & echo $! >> {p}; sleep 300 & echo $! >> {p}; echo $$ >> {p}; wait",
        p = pid_file.display()
    );
    let (stack, _) = exec_stack(
        tmp.path(),
        limited(1, vec![("long", sh(&script, 600, 1, &[]))]),
        1,
    )
    .await;
    let running = submit(&stack, "app", "long").await;
    wait_command_started(&stack, running, 1).await;
    while pids(&pid_file).len() < 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The repository's only slot is taken: this one waits in the queue.
    let queued = submit(&stack, "app", "long").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status(&stack, queued).await.as_deref(), Some("queued"));

    // The queued one, from the CLI.
    let config = stack.settings_file();
    let (ok, out) = stack
        .mhv(
            &config,
            &[
                "tasks",
                "cancel",
                &queued.to_string(),
                "--reason",
                "not needed",
            ],
        )
        .await;
    assert!(ok, "{out}");
    assert!(out.contains("cancelled (it was queued)"), "{out}");

    // The running one, over HTTP.
    let started = Instant::now();
    let r = stack
        .http
        .post(format!("{}/v1/tasks/{running}/cancel", stack.base()))
        .bearer_auth(API_KEY)
        .json(&json!({"reason": "changed my mind"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "cancelled");
    assert_eq!(body["previous_status"], "running");
    let p = pids(&pid_file);
    while p.iter().any(|p| alive(*p)) {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "process tree still alive after 2 s: {:?}",
            p.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    eprintln!("cancelled process tree gone after {took:?}");

    let start = Instant::now();
    while runs(&stack, running).await[0].state == "running" {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(runs(&stack, running).await[0].state, "cancelled");
    assert_eq!(status(&stack, running).await.as_deref(), Some("cancelled"));
    let cancelled: Vec<(String, Value)> = events(&stack, running)
        .await
        .into_iter()
        .filter(|e| e.0 == "task_cancelled")
        .collect();
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0].1["reason"], "changed my mind");
    assert_eq!(cancelled[0].1["from"], "running");
    let actor: String = sqlx::query_scalar(
        "SELECT actor FROM task_audit_log WHERE task_id = $1 AND event = 'task_cancelled'",
    )
    .bind(running)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(actor, "api:tester");

    // The queued one never started, though the slot is free now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(runs(&stack, queued).await.is_empty());
    assert_eq!(status(&stack, queued).await.as_deref(), Some("cancelled"));
    wait_exec_drained(&stack).await;

    // Idempotent; unknown ids and finished tasks get their codes.
    let again = stack
        .http
        .post(format!("{}/v1/tasks/{running}/cancel", stack.base()))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    let b: Value = again.json().await.unwrap();
    assert_eq!(b["previous_status"], "cancelled");
    let missing = stack
        .http
        .post(format!(
            "{}/v1/tasks/{}/cancel",
            stack.base(),
            Uuid::new_v4()
        ))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let b: Value = missing.json().await.unwrap();
    assert_eq!(b["code"], "MHV-100");
}

#[tokio::test]
async fn replaying_a_repaired_dead_letter_twice_yields_exactly_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let repaired = tmp.path().join("repaired");
    let effects = tmp.path().join("effects");
    let script = format!(
        "test -f {} || {{ echo not repaired >&2; exit 1; }}; echo ran $MHV_ATTEMPT >> {}",
        repaired.display(),
        effects.display()
    );
    let (stack, _) = exec_stack(
        tmp.path(),
        one(vec![("fix-me", sh(&script, 30, 1, &[]))]),
        1,
    )
    .await;
    let id = submit(&stack, "app", "fix-me").await;
    wait_status(&stack, id, "failed", Duration::from_secs(20)).await;
    let dl: i64 = sqlx::query_scalar("SELECT id FROM dead_letters WHERE task_id = $1")
        .bind(id)
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    let config = stack.settings_file();
    let (ok, out) = stack.mhv(&config, &["dlq", "list"]).await;
    assert!(
        ok && out.contains(&format!("task {id}")) && out.contains("MHV-204"),
        "{out}"
    );
    let (ok, out) = stack.mhv(&config, &["dlq", "show", &dl.to_string()]).await;
    assert!(ok && out.contains("exited with 1"), "{out}");

    std::fs::write(&repaired, "").unwrap();
    let dl = dl.to_string();
    let (ok1, out1) = stack.mhv(&config, &["dlq", "replay", &dl]).await;
    let (ok2, out2) = stack.mhv(&config, &["dlq", "replay", &dl]).await;
    assert!(ok1 && ok2, "{out1}\n{out2}");
    assert!(out1.contains("queued again"), "{out1}");
    assert!(out2.contains("replayed already"), "{out2}");
    wait_status(&stack, id, "completed", Duration::from_secs(20)).await;
    // A third, after it completed, does nothing either.
    let (ok3, out3) = stack.mhv(&config, &["dlq", "replay", &dl]).await;
    assert!(ok3 && out3.contains("nothing done"), "{out3}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let r = runs(&stack, id).await;
    let states: Vec<&str> = r.iter().map(|x| x.state.as_str()).collect();
    assert_eq!(states, ["failed", "succeeded"]);
    assert_eq!(lines(&effects), ["ran 2"]);
    let retried = events(&stack, id)
        .await
        .iter()
        .filter(|e| e.0 == "task_retried")
        .count();
    assert_eq!(retried, 1);
    let (ok, out) = stack.mhv(&config, &["dlq", "list"]).await;
    assert!(ok && !out.contains(&format!("task {id}")), "{out}");
    wait_exec_drained(&stack).await;
}

/// Runs recorded by the action itself: (task, start ns, end ns).
fn intervals(log: &Path) -> Vec<(String, u128, u128)> {
    let mut starts = BTreeMap::new();
    let mut out = Vec::new();
    for l in lines(log) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (kind, t, task) = (f[0], f[1].parse::<u128>().unwrap(), f[2].to_owned());
        if kind == "start" {
            starts.insert(task, t);
        } else {
            let s = starts.remove(&task).unwrap();
            out.push((task, s, t));
        }
    }
    out.sort_by_key(|x| x.1);
    out
}

fn max_overlap(iv: &[(String, u128, u128)]) -> usize {
    iv.iter()
        .map(|(_, s, _)| iv.iter().filter(|(_, a, b)| a <= s && s < b).count())
        .max()
        .unwrap_or(0)
}

#[tokio::test]
async fn a_per_repository_limit_of_one_holds_across_two_worker_replicas() {
    let tmp = tempfile::tempdir().unwrap();
    let serial_log = tmp.path().join("serial.log");
    let free_log = tmp.path().join("free.log");
    let script = |log: &Path| {
        format!(
            "echo start $(date +%s%N) $MHV_TASK_ID >> {l}; sleep 0.4; echo end $(date +%s%N) $MHV_TASK_ID >> {l}",
            l = log.display()
        )
    };
    let (serial, free) = (script(&serial_log), script(&free_log));
    let (stack, _) = exec_stack(
        tmp.path(),
        vec![
            Repo {
                name: "serial",
                limit: 1,
                actions: vec![("go", sh(&serial, 30, 1, &[]))],
                gates: vec![],
            },
            Repo {
                name: "free",
                limit: 0,
                actions: vec![("go", sh(&free, 30, 1, &[]))],
                gates: vec![],
            },
        ],
        2,
    )
    .await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(submit(&stack, "serial", "go").await);
    }
    for id in &ids {
        wait_status(&stack, *id, "completed", Duration::from_secs(60)).await;
    }
    let iv = intervals(&serial_log);
    assert_eq!(iv.len(), 6, "{iv:?}");
    for w in iv.windows(2) {
        assert!(w[1].1 >= w[0].2, "runs overlap: {w:?}");
    }
    let workers: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT worker_id) FROM task_runs r JOIN tasks t ON t.id = r.task_id WHERE t.repository = 'serial'",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    eprintln!("serial repository: 6 runs on {workers} worker replica(s), never overlapping");

    // The same check sees overlap where there is no limit (so it can fail).
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(submit(&stack, "free", "go").await);
    }
    for id in &ids {
        wait_status(&stack, *id, "completed", Duration::from_secs(60)).await;
    }
    let iv = intervals(&free_log);
    assert_eq!(iv.len(), 4);
    assert!(max_overlap(&iv) >= 2, "no overlap without a limit: {iv:?}");
    wait_exec_drained(&stack).await;
}

#[tokio::test]
async fn tasks_naming_what_the_registry_lacks_are_refused_with_their_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = make_repo(tmp.path());
    let wt = tmp.path().join("worktrees");
    let stack = TestStack::start(
        |s| {
            configure(s, &repo, &wt, one(vec![("ok", sh("true", 30, 1, &[]))]));
            s.repositories.insert("notes".into(), Repository::default());
        },
        1,
    )
    .await;
    for (body, code) in [
        (json!({"title": "t", "repository": "nope"}), "MHV-200"),
        (
            json!({"title": "t", "repository": "notes", "metadata": {"action": "ok"}}),
            "MHV-201",
        ),
        (
            json!({"title": "t", "repository": "app", "metadata": {"action": "deploy"}}),
            "MHV-203",
        ),
    ] {
        let r = stack.create(&body, None).await;
        assert_eq!(r.status(), 422, "{body}");
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["code"], code, "{b}");
    }
    // A record for people: registered, no action named, no default: stored, never run.
    let r = stack
        .create(&json!({"title": "t", "repository": "notes"}), None)
        .await;
    assert_eq!(r.status(), 202);
    // A producer that bypasses the gateway is refused by the workers (dead letter, no task).
    let nats = stack.nats_client().await;
    let js = async_nats::jetstream::new(nats);
    js.publish(
        mahavishnu::topology::SUBJECT_TASKS_CREATE,
        serde_json::to_vec(
            &json!({"title": "t", "repository": "app", "metadata": {"action": "rm-rf"}}),
        )
        .unwrap()
        .into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let n = stack
        .wait_count(
            "SELECT count(*) FROM dead_letters WHERE error_code = 'MHV-203'",
            1,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(n, 1);
    assert_eq!(stack.count("SELECT count(*) FROM tasks").await, 1);
    assert_eq!(stack.count("SELECT count(*) FROM task_runs").await, 0);
}

#[tokio::test]
async fn cancelling_a_task_whose_worker_died_cleans_up_its_orphaned_command_and_worktree() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut stack, _) = exec_stack(
        tmp.path(),
        one(vec![("long", sh("sleep 300", 600, 3, &[]))]),
        0,
    )
    .await;
    let mut a = stack.spawn_worker_process();
    let id = submit(&stack, "app", "long").await;
    let pgid = wait_command_started(&stack, id, 1).await;
    let stale = runs(&stack, id).await[0].worktree.clone().unwrap();
    a.kill().unwrap();
    a.wait().unwrap();
    stack.spawn_worker();
    // Answered by a worker: 503 MHV-008 until the new one serves requests.
    let start = Instant::now();
    loop {
        let r = stack
            .http
            .post(format!("{}/v1/tasks/{id}/cancel", stack.base()))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nobody runs it, so nobody heard the broadcast; the redelivered request cleans up.
    let start = Instant::now();
    while runs(&stack, id).await[0].state == "running" {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "orphaned attempt never cleaned up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = runs(&stack, id).await;
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].state, "abandoned");
    assert!(!mahavishnu_workers::exec::process::group_alive(pgid));
    assert!(!Path::new(&stale).exists());
    assert_eq!(status(&stack, id).await.as_deref(), Some("cancelled"));
    wait_exec_drained(&stack).await;
}

#[tokio::test]
async fn a_blocked_task_does_not_start_until_unblocked_and_assignment_is_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let (stack, _) = exec_stack(
        tmp.path(),
        limited(1, vec![("nap", sh("sleep 1", 30, 1, &[]))]),
        1,
    )
    .await;
    let first = submit(&stack, "app", "nap").await;
    wait_command_started(&stack, first, 1).await;
    // Waits for the repository's only slot; blocked meanwhile.
    let second = submit(&stack, "app", "nap").await;
    let config = stack.settings_file();
    let id = second.to_string();
    let (ok, out) = stack
        .mhv(
            &config,
            &["tasks", "block", &id, "--reason", "waiting on QA"],
        )
        .await;
    assert!(ok && out.contains("blocked (it was queued)"), "{out}");
    wait_status(&stack, first, "completed", Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(runs(&stack, second).await.is_empty(), "a blocked task ran");
    assert_eq!(status(&stack, second).await.as_deref(), Some("blocked"));
    // A running or finished task cannot be blocked.
    let (ok, out) = stack
        .mhv(&config, &["tasks", "block", &first.to_string()])
        .await;
    assert!(!ok && out.contains("MHV-104"), "{out}");

    let (ok, out) = stack
        .mhv(&config, &["tasks", "assign", &id, "--user", "system"])
        .await;
    assert!(ok, "{out}");
    let (ok, out) = stack
        .mhv(&config, &["tasks", "assign", &id, "--user", "nobody"])
        .await;
    assert!(!ok && out.contains("MHV-003"), "{out}");
    let (ok, out) = stack.mhv(&config, &["tasks", "unblock", &id]).await;
    assert!(ok, "{out}");
    wait_status(&stack, second, "completed", Duration::from_secs(20)).await;
    let ev: Vec<String> = events(&stack, second)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    let pos = |e: &str| ev.iter().position(|x| x == e).unwrap_or(usize::MAX);
    assert!(
        pos("task_blocked") < pos("task_assigned")
            && pos("task_assigned") < pos("task_unblocked")
            && pos("task_unblocked") < pos("task_started")
            && pos("task_started") < pos("task_completed")
            && ev.contains(&"task_completed".to_owned()),
        "{ev:?}"
    );
    let (ok, out) = stack.mhv(&config, &["tasks", "runs", &id]).await;
    assert!(ok && out.contains("attempt 1: succeeded"), "{out}");
}
