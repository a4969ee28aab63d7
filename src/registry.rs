//! The repository registry and execution settings: which repositories the fleet knows, what it
//! may run in them, and how.
//!
//! Commands come only from here, never from API or webhook input: a task names a repository and,
//! optionally, one of that repository's actions (`metadata.action`); the argv, timeout and
//! environment are this configuration's.
//!
//! - An empty registry means a record-only fleet: tasks are stored, never executed, and any
//!   repository name is accepted.
//! - Otherwise a task must name a registered repository (`MHV-200`). A task that names an action
//!   needs a repository set up for execution (a `path` and at least one action, `MHV-201`) and an
//!   action it has (`MHV-203`). A task that names none runs the repository's `default_action`, or,
//!   without one, stays `queued` as a record for people (assignment, blocking).

use crate::error::ErrorCode;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// How the workers execute tasks (`[execution]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ExecutionSettings {
    /// Directory under which each attempt gets its git worktree (`{root}/{repository}/{task}-{attempt}`).
    pub worktree_root: String,
    /// Tasks one worker replica runs at once.
    pub max_concurrent: usize,
    /// JetStream stream of execution requests (`mhv.exec.{repository}`).
    pub stream: String,
    /// Durable pull consumer every worker replica shares for execution requests.
    pub consumer: String,
    /// How long an execution request may go unacknowledged. A running task sends an in-progress
    /// ack every third of it; a worker that stops sending them (paused, cut off) has its request
    /// redelivered, and the database lock decides whether the task is really orphaned.
    pub ack_wait_secs: u64,
    /// Delay before the second attempt after a passing failure; it doubles per attempt, with
    /// jitter, up to `retry_max_delay_ms`.
    pub retry_delay_ms: u64,
    /// Longest delay between attempts.
    pub retry_max_delay_ms: u64,
    /// After a timeout or a cancellation, how long the process group has between SIGTERM and
    /// SIGKILL. At most 1,500 ms, so a cancelled task is gone within 2 s.
    pub kill_grace_ms: u64,
    /// Bytes of stdout and of stderr kept per attempt (the tail).
    pub output_tail_bytes: usize,
    /// When a task's repository is at its fleet-wide limit, how long before the request is tried
    /// again.
    pub slot_wait_ms: u64,
}

impl Default for ExecutionSettings {
    fn default() -> Self {
        Self {
            worktree_root: "/tmp/mahavishnu/worktrees".into(),
            max_concurrent: 2,
            stream: "MHV_EXEC".into(),
            consumer: "mhv-executors".into(),
            ack_wait_secs: 30,
            retry_delay_ms: 5_000,
            retry_max_delay_ms: 300_000,
            kill_grace_ms: 1_000,
            output_tail_bytes: 16 * 1024,
            slot_wait_ms: 1_000,
        }
    }
}

/// A repository the fleet knows (`[repositories.NAME]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Repository {
    /// Path of the git repository on every worker. Empty: registered, not set up for execution.
    pub path: String,
    /// Branch each attempt's worktree starts from.
    pub default_branch: String,
    /// Action run for tasks that name none; none: such tasks are records, not runs.
    pub default_action: Option<String>,
    /// Runs of this repository at once across the whole fleet; 0 = no limit.
    pub max_concurrent: u32,
    /// Named actions.
    pub actions: BTreeMap<String, Action>,
    /// Named quality gates (checks run in the worktree after a successful action).
    pub gates: BTreeMap<String, Gate>,
}

/// A named command a task may run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Action {
    /// Program and arguments (no shell unless you name one).
    pub argv: Vec<String>,
    /// Killed (with its whole process group) after this long.
    pub timeout_secs: u64,
    /// Environment variables passed through from the worker; every other one is removed.
    /// `MHV_TASK_ID`, `MHV_ATTEMPT`, `MHV_REPOSITORY` and `MHV_ACTION` are always set.
    pub env: Vec<String>,
    /// Attempts before the task is dead-lettered (1 = no retry).
    pub max_attempts: u32,
    /// Exit codes that mean "try again later" (a timeout always does).
    pub retryable_exit_codes: Vec<i32>,
    /// Gates to run after it; absent: every gate of the repository.
    pub gates: Option<Vec<String>>,
}

impl Default for Action {
    fn default() -> Self {
        Self {
            argv: Vec::new(),
            timeout_secs: 600,
            env: vec!["PATH".into(), "HOME".into(), "LANG".into()],
            max_attempts: 3,
            retryable_exit_codes: Vec::new(),
            gates: None,
        }
    }
}

/// A quality gate: a check run after a successful action; a failure fails the task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Gate {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Killed after this long (counts as a failed gate).
    pub timeout_secs: u64,
    /// Environment variables passed through from the worker.
    pub env: Vec<String>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            argv: Vec::new(),
            timeout_secs: 300,
            env: vec!["PATH".into(), "HOME".into(), "LANG".into()],
        }
    }
}

/// What a task will run, once resolved against the registry.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    /// Repository name.
    pub repository: &'a str,
    /// Its configuration.
    pub repo: &'a Repository,
    /// Action name.
    pub action_name: &'a str,
    /// The action.
    pub action: &'a Action,
}

impl Plan<'_> {
    /// The gates to run after the action, in order.
    pub fn gates(&self) -> Vec<(&str, &Gate)> {
        match &self.action.gates {
            Some(names) => names
                .iter()
                .filter_map(|n| self.repo.gates.get_key_value(n.as_str()))
                .map(|(k, g)| (k.as_str(), g))
                .collect(),
            None => self
                .repo
                .gates
                .iter()
                .map(|(k, g)| (k.as_str(), g))
                .collect(),
        }
    }
}

/// Why a task cannot be run as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PlanError {
    /// MHV-200, MHV-201 or MHV-203.
    pub code: ErrorCode,
    /// The field at fault (`repository` or `metadata.action`).
    pub field: &'static str,
    /// What is wrong, for the caller.
    pub message: String,
}

impl Repository {
    /// Set up for execution: a path and at least one action.
    pub fn executable(&self) -> bool {
        !self.path.is_empty() && !self.actions.is_empty()
    }
}

/// The action a task names, from its metadata (`metadata.action`, a string).
pub fn requested_action(metadata: &serde_json::Value) -> Option<&str> {
    metadata.get("action").and_then(|a| a.as_str())
}

/// Resolves what a task runs: `Ok(None)` when it runs nothing (record-only fleet, or no action
/// named and no default), an error when it names what the registry does not have.
pub fn resolve<'a>(
    registry: &'a BTreeMap<String, Repository>,
    repository: &'a str,
    action: Option<&'a str>,
) -> Result<Option<Plan<'a>>, PlanError> {
    if registry.is_empty() {
        return Ok(None);
    }
    let Some((name, repo)) = registry.get_key_value(repository) else {
        return Err(PlanError {
            code: ErrorCode::RepositoryNotFound,
            field: "repository",
            message: format!(
                "no repository {repository:?} is registered; `mhv config check` lists the registry"
            ),
        });
    };
    let Some(action_name) = action.or(repo.default_action.as_deref()) else {
        return Ok(None);
    };
    if !repo.executable() {
        return Err(PlanError {
            code: ErrorCode::RepositoryNotConfigured,
            field: "metadata.action",
            message: format!("repository {repository:?} is not set up for execution (it has no path or no actions)"),
        });
    }
    let Some((action_name, action)) = repo.actions.get_key_value(action_name) else {
        let known: Vec<&str> = repo.actions.keys().map(String::as_str).collect();
        return Err(PlanError {
            code: ErrorCode::ActionNotFound,
            field: "metadata.action",
            message: format!(
                "repository {repository:?} has no action {action_name:?}; it has: {}",
                known.join(", ")
            ),
        });
    };
    Ok(Some(Plan {
        repository: name,
        repo,
        action_name,
        action,
    }))
}

/// What a validated task runs (see [`resolve`]).
pub fn plan_for<'a>(
    registry: &'a BTreeMap<String, Repository>,
    task: &'a crate::task::NewTask,
) -> Result<Option<Plan<'a>>, PlanError> {
    resolve(registry, &task.repository, requested_action(&task.metadata))
}

/// Checks the registry and execution settings; the message names the setting.
pub fn validate(
    exec: &ExecutionSettings,
    registry: &BTreeMap<String, Repository>,
) -> Result<(), String> {
    let name_ok = |s: &str| crate::task::validate::is_valid_repository(s, 64);
    if !exec.worktree_root.starts_with('/') {
        return Err("execution.worktree_root must be an absolute path".into());
    }
    if exec.max_concurrent == 0 || exec.max_concurrent > 256 {
        return Err("execution.max_concurrent must be within 1..=256".into());
    }
    if !name_ok(&exec.stream) || !name_ok(&exec.consumer) {
        return Err(
            "execution.stream and execution.consumer must match ^[A-Za-z0-9_-]{1,64}$".into(),
        );
    }
    // In-progress acks go out every third of the ack wait; under 3 s they would be a flood, and
    // one lost to a hiccup would already redeliver a running task.
    if exec.ack_wait_secs < 3 {
        return Err("execution.ack_wait_secs must be at least 3 (a running task sends an in-progress ack every ack_wait_secs / 3)".into());
    }
    if exec.retry_delay_ms == 0 || exec.retry_max_delay_ms < exec.retry_delay_ms {
        return Err(
            "execution.retry_delay_ms must be > 0 and at most execution.retry_max_delay_ms".into(),
        );
    }
    if exec.kill_grace_ms > 1_500 {
        return Err("execution.kill_grace_ms must be at most 1500: a cancelled task must be gone within 2 s".into());
    }
    if exec.output_tail_bytes == 0 || exec.output_tail_bytes > 1 << 20 {
        return Err("execution.output_tail_bytes must be within 1..=1048576".into());
    }
    if exec.slot_wait_ms == 0 {
        return Err("execution.slot_wait_ms must be > 0".into());
    }
    for (name, repo) in registry {
        let at = format!("repositories.{name}");
        if !crate::task::validate::is_valid_repository(name, 100) {
            return Err(format!(
                "{at}: the name must match ^[A-Za-z0-9_-]{{1,100}}$ (it is what tasks name)"
            ));
        }
        if !repo.path.is_empty() && !repo.path.starts_with('/') {
            return Err(format!("{at}.path must be an absolute path"));
        }
        if !repo.path.is_empty()
            && (repo.default_branch.is_empty() || repo.default_branch.starts_with('-'))
        {
            return Err(format!(
                "{at}.default_branch must be set (and not start with '-')"
            ));
        }
        if let Some(d) = &repo.default_action {
            if !repo.actions.contains_key(d) {
                return Err(format!(
                    "{at}.default_action {d:?} is not one of its actions"
                ));
            }
        }
        for (gname, gate) in &repo.gates {
            if gate.argv.is_empty() || gate.argv[0].is_empty() {
                return Err(format!("{at}.gates.{gname}.argv must name a program"));
            }
            if gate.timeout_secs == 0 || gate.timeout_secs > 86_400 {
                return Err(format!(
                    "{at}.gates.{gname}.timeout_secs must be within 1..=86400"
                ));
            }
        }
        for (aname, a) in &repo.actions {
            let at = format!("{at}.actions.{aname}");
            if !name_ok(aname) {
                return Err(format!("{at}: the name must match ^[A-Za-z0-9_-]{{1,64}}$"));
            }
            if a.argv.is_empty() || a.argv[0].is_empty() {
                return Err(format!("{at}.argv must name a program"));
            }
            if a.timeout_secs == 0 || a.timeout_secs > 86_400 {
                return Err(format!("{at}.timeout_secs must be within 1..=86400"));
            }
            if a.max_attempts == 0 || a.max_attempts > 100 {
                return Err(format!("{at}.max_attempts must be within 1..=100"));
            }
            if a.retryable_exit_codes.contains(&0) {
                return Err(format!("{at}.retryable_exit_codes must not contain 0"));
            }
            for g in a.gates.iter().flatten() {
                if !repo.gates.contains_key(g) {
                    return Err(format!(
                        "{at}.gates names {g:?}, which {name} does not define"
                    ));
                }
            }
        }
    }
    Ok(())
}

impl ExecutionSettings {
    /// Delay before attempt `next` (2, 3, …): `retry_delay_ms` doubling per attempt, with jitter
    /// of up to one more delay, capped at `retry_max_delay_ms`. Attempt n+1 never waits less than
    /// attempt n did.
    pub fn retry_delay(&self, next: u32) -> Duration {
        use backon::BackoffBuilder as _;
        let n = usize::try_from(next.saturating_sub(2).min(32)).unwrap_or(0);
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.retry_delay_ms))
            .with_max_delay(Duration::from_millis(self.retry_max_delay_ms))
            .with_jitter()
            .without_max_times()
            .build()
            .nth(n)
            .unwrap_or(Duration::from_millis(self.retry_max_delay_ms))
            .min(Duration::from_millis(self.retry_max_delay_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> BTreeMap<String, Repository> {
        let mut actions = BTreeMap::new();
        actions.insert(
            "test".to_owned(),
            Action {
                argv: vec!["true".into()],
                ..Action::default()
            },
        );
        let mut r = BTreeMap::new();
        r.insert(
            "app".to_owned(),
            Repository {
                path: "/srv/app".into(),
                default_branch: "main".into(),
                actions,
                ..Repository::default()
            },
        );
        r.insert("notes".to_owned(), Repository::default());
        r
    }

    #[test]
    fn resolution_codes() {
        let r = registry();
        assert!(resolve(&BTreeMap::new(), "anything", Some("x"))
            .expect("record-only")
            .is_none());
        let e = resolve(&r, "nope", None).expect_err("unknown");
        assert_eq!(e.code, ErrorCode::RepositoryNotFound);
        let e = resolve(&r, "notes", Some("test")).expect_err("not set up");
        assert_eq!(e.code, ErrorCode::RepositoryNotConfigured);
        assert!(resolve(&r, "notes", None).expect("record").is_none());
        let e = resolve(&r, "app", Some("deploy")).expect_err("unknown action");
        assert_eq!(e.code, ErrorCode::ActionNotFound);
        assert!(e.message.contains("test"), "{}", e.message);
        let p = resolve(&r, "app", Some("test")).expect("ok").expect("runs");
        assert_eq!(p.action_name, "test");
        assert!(resolve(&r, "app", None).expect("ok").is_none());
    }

    #[test]
    fn validation_names_the_setting() {
        let mut r = registry();
        let exec = ExecutionSettings::default();
        validate(&exec, &r).expect("valid");
        r.get_mut("app").expect("app").default_action = Some("deploy".into());
        assert!(validate(&exec, &r)
            .expect_err("bad default")
            .contains("default_action"));
        let mut r = registry();
        r.get_mut("app")
            .expect("app")
            .actions
            .get_mut("test")
            .expect("test")
            .gates = Some(vec!["lint".into()]);
        assert!(validate(&exec, &r).expect_err("bad gate").contains("lint"));
        let e = ExecutionSettings {
            kill_grace_ms: 5_000,
            ..ExecutionSettings::default()
        };
        assert!(validate(&e, &registry())
            .expect_err("grace")
            .contains("kill_grace_ms"));
    }

    #[test]
    fn retry_delays_grow() {
        let e = ExecutionSettings {
            retry_delay_ms: 100,
            retry_max_delay_ms: 100_000,
            ..ExecutionSettings::default()
        };
        for _ in 0..50 {
            let d: Vec<Duration> = (2..8).map(|n| e.retry_delay(n)).collect();
            assert!(d.windows(2).all(|w| w[0] <= w[1]), "{d:?}");
            assert!(d[0] >= Duration::from_millis(100) && d[0] <= Duration::from_millis(200));
        }
        assert!(e.retry_delay(1_000) <= Duration::from_millis(100_000));
    }
}
