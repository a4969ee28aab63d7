//! Running one configured command: its own process group, an environment built from an
//! allow-list, a timeout and cancellation that kill the whole group, and stdout/stderr captured
//! with a size cap and secrets redacted.
//!
//! The whole group is killed in every case once the command is over — after a timeout, a
//! cancellation, and also after a normal exit — so a background grandchild can neither outlive
//! its task nor hold the output pipes open.
//!
//! Limit: a process that deliberately leaves the group (`setsid`, `setpgid`) escapes it; only a
//! cgroup per attempt would contain that. Commands come from operator configuration.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

/// What to run. Built from configuration only, never from task or webhook input.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Program and arguments (no shell unless the configuration names one).
    pub argv: Vec<String>,
    /// Working directory (the attempt's worktree).
    pub cwd: PathBuf,
    /// Variables passed through from the worker's environment when set there.
    pub env_allow: Vec<String>,
    /// Variables set for the command (after the allow-list).
    pub env_set: Vec<(String, String)>,
    /// Wall-clock limit.
    pub timeout: Duration,
    /// Bytes of the end of stdout and of stderr kept (each).
    pub output_cap: usize,
    /// Strings replaced by `[REDACTED]` in the captured output.
    pub secrets: Vec<String>,
    /// After SIGTERM to the group, how long before SIGKILL.
    pub kill_grace: Duration,
}

/// How the command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It exited by itself with this code.
    Code(i32),
    /// A signal ended it (not one we sent).
    Signal(i32),
    /// It ran past its timeout; the group was killed.
    TimedOut,
    /// It was cancelled; the group was killed.
    Cancelled,
}

/// The outcome of one run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// How it ended.
    pub exit: Exit,
    /// Wall-clock time from spawn to the end of the group.
    pub duration: Duration,
    /// The end of stdout (at most `output_cap` bytes, lossily decoded, secrets redacted).
    pub stdout_tail: String,
    /// The end of stderr, likewise.
    pub stderr_tail: String,
    /// Bytes written to stdout in total.
    pub stdout_bytes: u64,
    /// Bytes written to stderr in total.
    pub stderr_bytes: u64,
    /// Process group id (the child's pid).
    pub pgid: i32,
}

impl Outcome {
    /// True when it exited with code 0.
    pub fn succeeded(&self) -> bool {
        self.exit == Exit::Code(0)
    }
}

/// Why the command could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// `argv` is empty.
    #[error("the command is empty")]
    Empty,
    /// The OS refused (program not found, not executable, bad cwd).
    #[error("cannot start {program:?}: {source}")]
    Io {
        /// The program.
        program: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Runs `spec` until it exits, times out or `cancel` fires.
pub async fn run(spec: &Spec, cancel: &CancellationToken) -> Result<Outcome, SpawnError> {
    run_notify(spec, cancel, None).await
}

/// [`run`], sending the process group id on `spawned` as soon as the command started (so the
/// caller can record it while the command runs).
pub async fn run_notify(
    spec: &Spec,
    cancel: &CancellationToken,
    spawned: Option<tokio::sync::oneshot::Sender<i32>>,
) -> Result<Outcome, SpawnError> {
    let (program, args) = spec.argv.split_first().ok_or(SpawnError::Empty)?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(&spec.cwd)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so the whole tree can be signalled at once.
        .process_group(0)
        .kill_on_drop(true);
    for name in &spec.env_allow {
        if let Some(v) = std::env::var_os(name) {
            cmd.env(name, v);
        }
    }
    for (k, v) in &spec.env_set {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| SpawnError::Io {
        program: program.clone(),
        source,
    })?;
    let pgid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .unwrap_or_default();
    if let Some(tx) = spawned {
        let _ = tx.send(pgid);
    }
    let out = tokio::spawn(capture(child.stdout.take(), spec.output_cap));
    let err = tokio::spawn(capture(child.stderr.take(), spec.output_cap));

    let exit = tokio::select! {
        status = child.wait() => match status {
            Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                (Some(c), _) => Exit::Code(c),
                (None, Some(sig)) => Exit::Signal(sig),
                (None, None) => Exit::Signal(0),
            },
            Err(_) => Exit::Signal(0),
        },
        () = tokio::time::sleep(spec.timeout) => Exit::TimedOut,
        () = cancel.cancelled() => Exit::Cancelled,
    };
    // Whatever happened, nothing of the group survives the run.
    if matches!(exit, Exit::TimedOut | Exit::Cancelled) {
        signal_group(pgid, libc::SIGTERM);
        let deadline = Instant::now() + spec.kill_grace;
        while group_alive(pgid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    signal_group(pgid, libc::SIGKILL);
    let _ = child.wait().await;
    while group_alive(pgid) {
        // Killed members linger until their parent reaps them (init, for orphans).
        if started.elapsed() > spec.timeout + spec.kill_grace + Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let duration = started.elapsed();
    // A process that left the group (setsid, a daemon) may still hold the pipes: give the
    // readers a moment, then stop waiting for them.
    let (stdout_tail, stdout_bytes) = drain(out).await;
    let (stderr_tail, stderr_bytes) = drain(err).await;
    Ok(Outcome {
        exit,
        duration,
        stdout_tail: redact(&stdout_tail, &spec.secrets),
        stderr_tail: redact(&stderr_tail, &spec.secrets),
        stdout_bytes,
        stderr_bytes,
        pgid,
    })
}

/// The reader's result, or what it has nothing of if the pipe stays open past a grace period.
async fn drain(reader: tokio::task::JoinHandle<(String, u64)>) -> (String, u64) {
    let abort = reader.abort_handle();
    match tokio::time::timeout(Duration::from_secs(2), reader).await {
        Ok(r) => r.unwrap_or_default(),
        Err(_) => {
            abort.abort();
            (
                "[output not captured: a process outside the group kept the pipe open]".into(),
                0,
            )
        }
    }
}

/// Reads a pipe to its end, keeping the last `cap` bytes.
async fn capture<R: AsyncRead + Unpin>(pipe: Option<R>, cap: usize) -> (String, u64) {
    let Some(mut pipe) = pipe else {
        return (String::new(), 0);
    };
    let mut tail: VecDeque<u8> = VecDeque::with_capacity(cap.min(64 * 1024));
    let mut total = 0u64;
    let mut buf = vec![0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n as u64;
                tail.extend(&buf[..n]);
                while tail.len() > cap {
                    tail.pop_front();
                }
            }
        }
    }
    let bytes: Vec<u8> = tail.into_iter().collect();
    (String::from_utf8_lossy(&bytes).into_owned(), total)
}

/// Replaces every occurrence of each (non-empty) secret.
pub fn redact(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text.to_owned(), |t, s| t.replace(s.as_str(), "[REDACTED]"))
}

/// True when a live process of group `pgid` runs with `NAME=value` for each pair in its
/// environment (read from `/proc/{pid}/environ`): how a takeover recognises the orphaned command
/// of a dead worker before killing its group, whatever the id was reused for since.
pub fn group_has_env(pgid: i32, pairs: &[(&str, &str)]) -> bool {
    group_members(pgid)
        .into_iter()
        .any(|pid| has_env(pid, pairs))
}

/// True when process `pid` runs with `NAME=value` for each pair in its environment.
pub fn has_env(pid: i32, pairs: &[(&str, &str)]) -> bool {
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
    pairs.iter().all(|(k, v)| {
        let want = format!("{k}={v}");
        vars.contains(&want.as_bytes())
    })
}

/// Sends `signal` to every process of group `pgid`.
pub fn signal_group(pgid: i32, signal: i32) {
    if pgid <= 1 {
        return;
    }
    #[allow(unsafe_code)]
    // SAFETY: kill(2) takes plain integers; a negative pid addresses a process group.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// True while a live (not zombie) process of group `pgid` exists. Read from `/proc`: a killed
/// orphan stays a zombie until whoever adopted it reaps it, which may be never in a container
/// whose init does not reap, and a zombie runs nothing.
pub fn group_alive(pgid: i32) -> bool {
    !group_members(pgid).is_empty()
}

/// Live (not zombie) processes of group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    if pgid <= 1 {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
            let rest = &stat[stat.rfind(')')? + 1..];
            let mut fields = rest.split_whitespace();
            let state = fields.next().unwrap_or("Z");
            let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
            (pgrp == Some(pgid) && state != "Z" && state != "X").then_some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout_ms: u64) -> Spec {
        Spec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            cwd: std::env::temp_dir(),
            env_allow: vec!["PATH".into()],
            env_set: vec![("MHV_TASK".into(), "t-1".into())],
            timeout: Duration::from_millis(timeout_ms),
            output_cap: 1024,
            secrets: vec!["hunter2".into()],
            kill_grace: Duration::from_millis(300),
        }
    }

    #[tokio::test]
    async fn success_and_failure_are_recorded_with_output() {
        let o = run(
            &sh("echo hello $MHV_TASK; echo oops >&2", 5_000),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(o.succeeded());
        assert_eq!(o.stdout_tail, "hello t-1\n");
        assert_eq!(o.stderr_tail, "oops\n");
        let o = run(&sh("exit 3", 5_000), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(o.exit, Exit::Code(3));
        assert!(matches!(
            run(
                &Spec {
                    argv: vec!["/nonexistent/program".into()],
                    ..sh("", 1_000)
                },
                &CancellationToken::new()
            )
            .await,
            Err(SpawnError::Io { .. })
        ));
    }

    /// Runs `script`, asserts that nothing of its process group survived, and returns the
    /// outcome with how long the run took.
    async fn run_checked(
        script: &str,
        timeout_ms: u64,
        cancel: &CancellationToken,
    ) -> (Outcome, Duration) {
        let started = Instant::now();
        let o = run(&sh(script, timeout_ms), cancel).await.unwrap();
        assert!(!group_alive(o.pgid), "a member of the group survived");
        (o, started.elapsed())
    }

    #[tokio::test]
    async fn a_hanging_command_and_its_children_are_killed_at_the_timeout() {
        // The shell ignores SIGTERM: only the SIGKILL after the grace period stops it.
        let script = "sleep 30 & sleep 30 & trap '' TERM; sleep 30";
        let (o, took) = run_checked(script, 300, &CancellationToken::new()).await;
        assert_eq!(o.exit, Exit::TimedOut);
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[tokio::test]
    async fn cancellation_stops_the_tree_within_two_seconds() {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c.cancel();
        });
        let (o, took) = run_checked("sleep 30 & sleep 30", 60_000, &cancel).await;
        assert_eq!(o.exit, Exit::Cancelled);
        assert!(took < Duration::from_millis(2_200), "{took:?}");
    }

    #[tokio::test]
    async fn a_background_grandchild_neither_outlives_the_run_nor_holds_the_pipes() {
        let (o, took) =
            run_checked("sleep 30 & echo done", 60_000, &CancellationToken::new()).await;
        assert!(o.succeeded());
        assert_eq!(o.stdout_tail, "done\n");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[tokio::test]
    async fn output_is_capped_to_its_tail_and_secrets_are_redacted() {
        let o = run(
            &sh(
                "head -c 100000 /dev/zero | tr '\\0' a; echo; echo pw=hunter2",
                5_000,
            ),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(o.stdout_bytes, 100_000 + 1 + 11);
        assert!(o.stdout_tail.len() <= 1024 + 10);
        assert!(
            o.stdout_tail.ends_with("pw=[REDACTED]\n"),
            "{}",
            o.stdout_tail
        );
        assert!(!o.stdout_tail.contains("hunter2"));
    }

    #[tokio::test]
    async fn only_allowed_variables_reach_the_command() {
        // HOME is set for the test process but not allowed here.
        assert!(std::env::var_os("HOME").is_some() || std::env::var_os("PATH").is_some());
        let o = run(
            &sh("env | cut -d= -f1 | sort", 5_000),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        let names: Vec<&str> = o.stdout_tail.lines().collect();
        assert!(
            names
                .iter()
                .all(|n| ["PATH", "MHV_TASK", "PWD", "SHLVL", "_", "OLDPWD"].contains(n)),
            "{names:?}"
        );
        assert!(names.contains(&"MHV_TASK"));
    }
}
