//! `mhv bench`: measures, in one run on one machine, with everything co-located:
//! (a) raw JetStream async-publish rate on the same nats-server;
//! (b) authenticated `POST /v1/tasks` through the gateway at N concurrent connections —
//!     throughput, p50/p99/p99.9 latency (HDR histogram), errors and gateway RSS;
//! (c) the rate at which queued tasks become persisted-and-audited rows with two workers,
//!     against a baseline of one message per transaction with the same SQL;
//! (d) signed GitHub-style `POST /v1/webhooks/{source}` at the same concurrency, against (b) as
//!     the baseline (what verification and the ledger front cost);
//! (e) the rate at which two workers turn those deliveries into ledger rows, tasks and audit
//!     rows, against (c).
//! It starts its own nats-server (random port, temporary store), bench database, gateway and
//! workers, so it never touches a running stack. Figures are printed with the ratios and targets.

use crate::config::{
    ApiKeySettings, LogFormat, Settings, WebhookRule, WebhookSecret, WebhookSource,
};
use crate::devstack::{nats::NatsServer, postgres::TestDatabase};
use crate::envelope::{self, Envelope};
use crate::task::TaskRequest;
use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, stream};
use hdrhistogram::Histogram;
use secrecy::SecretString;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `mhv bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Messages for the raw JetStream publish measurement (a).
    #[arg(long, default_value_t = 100_000)]
    pub raw_messages: u64,
    /// Concurrent HTTP connections for (b).
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    /// Seconds of HTTP load for (b).
    #[arg(long, default_value_t = 10)]
    pub http_seconds: u64,
    /// Messages for the one-per-transaction baseline of (c).
    #[arg(long, default_value_t = 5_000)]
    pub baseline_messages: u64,
    /// Tasks executed for (f) (and for its baseline).
    #[arg(long, default_value_t = 300)]
    pub exec_tasks: u64,
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        crate::devstack::terminate(&mut self.0, Duration::from_secs(20));
    }
}

/// Runs the benchmark.
pub async fn run(base: Settings, args: BenchArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("mhv-bench-{}", uuid::Uuid::new_v4().simple()));
    let nats = NatsServer::start(&dir.join("nats"), 0)?;
    let db = TestDatabase::create()
        .await
        .context("creating the bench database")?;
    let key = super::generate_key();
    let mut settings = base;
    settings.nats.url = nats.url();
    settings.database.url = SecretString::from(db.url.clone());
    settings.gateway.listen = format!("127.0.0.1:{}", crate::devstack::free_port()?);
    settings.gateway.api_keys = vec![ApiKeySettings {
        name: "bench".into(),
        sha256: crate::config::hash_api_key(&key),
    }];
    settings.worker.metrics_listen = String::new();
    let hook_secret = super::generate_key();
    settings
        .webhooks
        .sources
        .insert(BENCH_SOURCE.into(), bench_source());
    // (f) runs a no-op action in a git repository; (b)-(e) name a registered repository that
    // runs nothing (their tasks are records).
    let exec_repo = dir.join("exec-repo");
    super::up::ensure_demo_repo(&exec_repo)?;
    settings.execution.worktree_root = dir.join("worktrees").to_string_lossy().into_owned();
    settings.execution.max_concurrent = EXEC_CONCURRENCY;
    settings
        .repositories
        .insert("bench".into(), crate::registry::Repository::default());
    settings
        .repositories
        .insert(EXEC_REPOSITORY.into(), exec_repository(&exec_repo));
    settings.log.format = LogFormat::Json;
    settings.log.filter = "warn".into();
    settings.validate()?;
    let config = dir.join("bench.toml");
    std::fs::write(&config, toml::to_string(&settings)?)?;
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client.clone());
    println!(
        "mhv bench — nats-server {} at {}, PostgreSQL database {}",
        server_version(&client),
        nats.url(),
        db.name
    );
    println!(
        "machine: {} cores; everything co-located\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    // (a) raw JetStream async publish, the same payload size as a gateway message.
    let sample = sample_envelope()?;
    let raw_rate = raw_publish(&js, args.raw_messages, &sample).await?;
    println!("(a) raw JetStream async publish: {raw_rate:>10.0} msg/s  ({} msgs of {} bytes, file storage)", args.raw_messages, sample.len());

    // (b) HTTP through the gateway. Workers are not running yet: the gateway's figures are its
    // own, and what it accepts waits in JetStream for (c).
    let spawn = |bin: &str| -> anyhow::Result<Proc> {
        let exe = std::env::current_exe()?;
        let path = exe
            .parent()
            .map(|p| p.join(bin))
            .filter(|p| p.is_file())
            .with_context(|| {
                format!("{bin} must be built beside mhv (cargo build --release --workspace)")
            })?;
        Ok(Proc(
            Command::new(path)
                .arg("--config")
                .arg(&config)
                .env("MHV_DATABASE__URL", &db.url)
                .env("MHV_NATS__URL", nats.url())
                .env(BENCH_SECRET_ENV, &hook_secret)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ))
    };
    let gateway = spawn("mhv-gateway")?;
    let base_url = format!("http://{}", settings.gateway.listen);
    wait_ready(&base_url).await?;
    let cpu_before = [
        cpu_secs(Some(gateway.0.id())),
        cpu_secs(nats.pid()),
        cpu_secs(None),
    ];
    let task_body = bytes::Bytes::from(serde_json::to_vec(&serde_json::json!({
        "title": "Benchmark task", "repository": "bench", "priority": "high",
        "description": "A task created by mhv bench; its text is redacted in the audit log."
    }))?);
    let auth = format!("Bearer {key}");
    let http = http_load(
        &settings.gateway.listen,
        args.connections,
        Duration::from_secs(args.http_seconds),
        gateway.0.id(),
        move |host: &str, _n: u64| {
            Ok(hyper::Request::post("/v1/tasks")
                .header("host", host)
                .header("authorization", auth.as_str())
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(task_body.clone()))?)
        },
    )
    .await?;
    let ratio_b = http.rate / raw_rate;
    println!(
        "(b) POST /v1/tasks, {} connections: {:>10.0} req/s  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  errors {}  ({} requests)",
        args.connections, http.rate, http.p50_ms, http.p99_ms, http.p999_ms, http.errors, http.ok + http.errors
    );
    println!(
        "    gateway RSS: {:.1} MiB at the end, {:.1} MiB peak",
        http.rss_mib, http.rss_peak_mib
    );
    let cpu_after = [
        cpu_secs(Some(gateway.0.id())),
        cpu_secs(nats.pid()),
        cpu_secs(None),
    ];
    let per_req =
        |i: usize| (cpu_after[i] - cpu_before[i]) * 1e6 / (http.ok + http.errors).max(1) as f64;
    println!(
        "    CPU per request: gateway {:.1} µs, nats-server {:.1} µs, load generator {:.1} µs ({:.2} of {} cores busy)",
        per_req(0),
        per_req(1),
        per_req(2),
        (0..3).map(|i| cpu_after[i] - cpu_before[i]).sum::<f64>() / args.http_seconds as f64,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    drop(gateway);

    // (c) end to end: two workers drain what (b) accepted; timed from the first persisted row
    // seen to the last.
    let pool = sqlx::PgPool::connect(&db.url).await?;
    let want = i64::try_from(http.ok)?;
    let workers = vec![spawn("mhv-worker")?, spawn("mhv-worker")?];
    let e2e_secs = time_drain(&pool, "tasks", want, Duration::from_secs(600)).await?;
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM task_audit_log")
        .fetch_one(&pool)
        .await?;
    drop(workers);
    let e2e_rate = want as f64 / e2e_secs;
    println!("(c) end to end, 2 workers:     {e2e_rate:>10.0} tasks/s persisted and audited ({want} tasks, {audited} audit rows)");

    // (d) and (e): the same for webhooks, with (b) and (c) as their baselines.
    let gateway = spawn("mhv-gateway")?;
    wait_ready(&base_url).await?;
    // (d) webhooks, the gateway alone again: each request a new signed delivery with its own body
    // (GitHub sources deduplicate on the body too).
    let cpu_before = cpu_secs(Some(gateway.0.id()));
    let secret = hook_secret.clone();
    let hooks = http_load(
        &settings.gateway.listen,
        args.connections,
        Duration::from_secs(args.http_seconds),
        gateway.0.id(),
        move |host: &str, n: u64| {
            use hmac::Mac as _;
            let body = serde_json::to_vec(&serde_json::json!({
                "action": "opened",
                "issue": {"number": n, "title": format!("Bench issue {n}"), "body": "Opened by mhv bench."},
                "repository": {"name": "bench", "full_name": "mhv/bench", "default_branch": "main"},
                "sender": {"login": "mhv-bench"}
            }))?;
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())?;
            mac.update(&body);
            let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
            Ok(hyper::Request::post(format!("/v1/webhooks/{BENCH_SOURCE}"))
                .header("host", host)
                .header("x-github-event", "issues")
                .header("x-github-delivery", format!("bench-{n}"))
                .header("x-hub-signature-256", sig)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))?)
        },
    )
    .await?;
    let hook_cpu = (cpu_secs(Some(gateway.0.id())) - cpu_before) * 1e6
        / (hooks.ok + hooks.errors).max(1) as f64;
    let ratio_d = hooks.rate / http.rate;
    println!(
        "(d) POST /v1/webhooks/{BENCH_SOURCE}, {} connections: {:>10.0} req/s  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  errors {}  ({} requests)",
        args.connections, hooks.rate, hooks.p50_ms, hooks.p99_ms, hooks.p999_ms, hooks.errors, hooks.ok + hooks.errors
    );
    println!(
        "    gateway CPU per delivery {hook_cpu:.1} µs; {:.2}x the rate of (b), the gateway's task API",
        ratio_d
    );
    drop(gateway);
    let hooks_want = i64::try_from(hooks.ok)?;
    let workers = vec![spawn("mhv-worker")?, spawn("mhv-worker")?];
    let hook_secs = time_drain(
        &pool,
        "webhook_deliveries",
        hooks_want,
        Duration::from_secs(600),
    )
    .await?;
    drop(workers);
    let hook_rate = hooks_want as f64 / hook_secs;
    println!(
        "(e) webhook deliveries end to end, 2 workers: {hook_rate:>10.0} deliveries/s to ledger row + body + task + audit rows ({hooks_want} deliveries; {:.2}x the rate of (c))",
        hook_rate / e2e_rate
    );

    // (f) execution: tasks published straight to NATS, run by two workers (worktree, command,
    // cleanup, every state change and saga step recorded), against the same git work done by
    // one process with the same concurrency and no fleet around it.
    let n_exec = args.exec_tasks;
    let workers = vec![spawn("mhv-worker")?, spawn("mhv-worker")?];
    let started = Instant::now();
    for i in 0..n_exec {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("bench-exec-{i}").as_str());
        js.publish_with_headers(
            crate::topology::SUBJECT_TASKS_CREATE,
            h,
            serde_json::to_vec(&serde_json::json!({
                "title": format!("bench execution {i}"), "repository": EXEC_REPOSITORY
            }))?
            .into(),
        )
        .await?
        .await?;
    }
    let want_exec = i64::try_from(n_exec)?;
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'completed'")
            .fetch_one(&pool)
            .await?;
        if done >= want_exec {
            break;
        }
        if started.elapsed() > Duration::from_secs(900) {
            bail!("only {done} of {n_exec} executions completed within 15 min");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exec_secs = started.elapsed().as_secs_f64();
    drop(workers);
    let exec_rate = n_exec as f64 / exec_secs;
    let (p50, p99): (f64, f64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms)::float8,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ms)::float8
         FROM task_runs WHERE state = 'succeeded'",
    )
    .fetch_one(&pool)
    .await?;
    let conc_f = 2 * EXEC_CONCURRENCY;
    let raw_exec =
        raw_git_runs(&exec_repo, &dir.join("baseline-worktrees"), n_exec, conc_f).await?;
    println!(
        "(f) executions end to end, 2 workers x {EXEC_CONCURRENCY}: {exec_rate:>10.0} tasks/s published to completed ({n_exec} tasks: worktree, `true`, cleanup; command p50 {p50:.1} ms, p99 {p99:.1} ms)"
    );
    println!(
        "    baseline, the same worktree add + `true` + worktree remove, {conc_f} at a time in one process: {raw_exec:>10.0} runs/s; (f)/baseline = {:.2}x",
        exec_rate / raw_exec
    );

    // Baseline for (c): one message per transaction, same SQL, same concurrency as the workers.
    let conc = 2 * settings.worker.max_in_flight_batches;
    let single = one_per_transaction(&db.url, args.baseline_messages, conc).await?;
    println!("    baseline, 1 message per transaction, {conc} connections: {single:>10.0} tasks/s");
    let ratio_c = e2e_rate / single;

    println!("\nratios and targets");
    println!(
        "  (b)/(a) = {:.1}%   target >= 30%     {}",
        ratio_b * 100.0,
        verdict(ratio_b >= 0.30)
    );
    println!(
        "  (b) p99 = {:.2} ms  target <= 10 ms   {}",
        http.p99_ms,
        verdict(http.p99_ms <= 10.0)
    );
    println!(
        "  (c)/baseline = {ratio_c:.2}x  target >= 2x    {}",
        verdict(ratio_c >= 2.0)
    );
    println!(
        "  gateway RSS peak = {:.1} MiB  target <= 64 MiB  {}",
        http.rss_peak_mib,
        verdict(http.rss_peak_mib <= 64.0)
    );
    println!(
        "  (d)/(b) = {ratio_d:.2}x   webhooks against the task API on the same gateway (no target)"
    );
    println!(
        "  (e)/(c) = {:.2}x   webhook deliveries against tasks through the workers (no target)",
        hook_rate / e2e_rate
    );
    println!(
        "  (f)/baseline = {:.2}x   the fleet's execution against bare git + process work (no target)",
        exec_rate / raw_exec
    );
    pool.close().await;
    drop(nats);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The repository (f) executes in.
const EXEC_REPOSITORY: &str = "exec-bench";
/// Tasks each bench worker runs at once in (f).
const EXEC_CONCURRENCY: usize = 4;

fn exec_repository(dir: &Path) -> crate::registry::Repository {
    let mut r = crate::registry::Repository {
        path: dir.to_string_lossy().into_owned(),
        default_branch: "main".into(),
        default_action: Some("noop".into()),
        ..crate::registry::Repository::default()
    };
    r.actions.insert(
        "noop".into(),
        crate::registry::Action {
            argv: vec!["true".into()],
            timeout_secs: 60,
            max_attempts: 1,
            ..crate::registry::Action::default()
        },
    );
    r
}

/// The bare work of an execution, `concurrency` at a time: `git worktree add`, run `true` in
/// it, `git worktree remove`. Returns runs per second.
async fn raw_git_runs(repo: &Path, root: &Path, n: u64, concurrency: usize) -> anyhow::Result<f64> {
    std::fs::create_dir_all(root)?;
    let git_lock = Arc::new(tokio::sync::Mutex::new(()));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (repo, root, git_lock, next) = (
            repo.to_path_buf(),
            root.to_path_buf(),
            git_lock.clone(),
            next.clone(),
        );
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let path = root.join(format!("run-{i}"));
                let git = |args: Vec<std::ffi::OsString>| {
                    let repo = repo.clone();
                    async move {
                        let st = tokio::process::Command::new("git")
                            .arg("-C")
                            .arg(&repo)
                            .args(args)
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status()
                            .await?;
                        anyhow::ensure!(st.success(), "git failed");
                        anyhow::Ok(())
                    }
                };
                {
                    // The workers serialize worktree bookkeeping per repository too.
                    let _g = git_lock.lock().await;
                    // As the workers do: look for a stale one first.
                    git(vec!["worktree".into(), "list".into(), "--porcelain".into()]).await?;
                    git(vec![
                        "worktree".into(),
                        "add".into(),
                        "--detach".into(),
                        "--force".into(),
                        path.clone().into(),
                        "main".into(),
                    ])
                    .await?;
                }
                let st = tokio::process::Command::new("true")
                    .current_dir(&path)
                    .status()
                    .await?;
                anyhow::ensure!(st.success(), "true failed");
                let _g = git_lock.lock().await;
                git(vec!["worktree".into(), "list".into(), "--porcelain".into()]).await?;
                git(vec![
                    "worktree".into(),
                    "remove".into(),
                    "--force".into(),
                    "--force".into(),
                    path.into(),
                ])
                .await?;
                git(vec!["worktree".into(), "prune".into()]).await?;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// The webhook source the bench posts to.
const BENCH_SOURCE: &str = "bench-github";
/// Environment variable that carries its secret to the gateway (not an `MHV_` setting).
const BENCH_SECRET_ENV: &str = "MAHAVISHNU_BENCH_WEBHOOK_SECRET";

fn bench_source() -> WebhookSource {
    WebhookSource::github(
        vec![WebhookSecret::from_env("bench", BENCH_SECRET_ENV)],
        vec![WebhookRule::github_issue_opened()],
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn server_version(c: &async_nats::Client) -> String {
    c.server_info().version
}

fn sample_envelope() -> anyhow::Result<Vec<u8>> {
    Ok(envelope::encode_envelope(&Envelope {
        v: 1,
        principal: "bench".into(),
        accepted_at: chrono::Utc::now(),
        request: TaskRequest {
            title: Some("Benchmark task".into()),
            repository: Some("bench".into()),
            description: Some(
                "A task created by mhv bench; its text is redacted in the audit log.".into(),
            ),
            priority: Some("high".into()),
            ..Default::default()
        },
    })?)
}

async fn raw_publish(js: &jetstream::Context, n: u64, payload: &[u8]) -> anyhow::Result<f64> {
    let name = "MHV_BENCH_RAW";
    let _ = js.delete_stream(name).await;
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec!["mhv.bench.raw".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::copy_from_slice(payload);
    let start = Instant::now();
    let mut acks = Vec::with_capacity(4096);
    for _ in 0..n {
        acks.push(js.publish("mhv.bench.raw", payload.clone()).await?);
        if acks.len() >= 4096 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks {
        a.await?;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    js.delete_stream(name).await?;
    Ok(rate)
}

struct HttpResult {
    rate: f64,
    ok: u64,
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    rss_mib: f64,
    rss_peak_mib: f64,
}

/// `connections` HTTP/1.1 keep-alive connections, each sending requests back to back for
/// `duration`. A bare hyper client keeps the load generator's own CPU use low: it shares the two
/// cores with everything it measures.
async fn http_load<F>(
    addr: &str,
    connections: usize,
    duration: Duration,
    gateway_pid: u32,
    request: F,
) -> anyhow::Result<HttpResult>
where
    F: Fn(&str, u64) -> anyhow::Result<hyper::Request<http_body_util::Full<bytes::Bytes>>>
        + Clone
        + Send
        + 'static,
{
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                let (rss, _) = rss_of(gateway_pid);
                if rss.is_finite() {
                    peak.fetch_max((rss * 1024.0) as u64, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut handles = Vec::new();
    for c in 0..connections {
        let (addr, request) = (addr.to_owned(), request.clone());
        handles.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(&addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let (mut ok, mut errors) = (0u64, 0u64);
            let mut n = (c as u64) << 32;
            while Instant::now() < deadline {
                n += 1;
                let req = request(addr.as_str(), n)?;
                let t = Instant::now();
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                let status = resp.status().as_u16();
                http_body_util::BodyExt::collect(resp.into_body()).await?;
                let us = u64::try_from(t.elapsed().as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1);
                if status == 202 {
                    ok += 1;
                    let _ = hist.record(us);
                } else {
                    errors += 1;
                }
            }
            anyhow::Ok((hist, ok, errors))
        }));
    }
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut ok, mut errors) = (0, 0);
    for h in handles {
        let (hh, o, e) = h.await??;
        hist.add(hh).map_err(|e| anyhow::anyhow!("{e}"))?;
        ok += o;
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    sampler.abort();
    let (rss, hwm) = rss_of(gateway_pid);
    let sampled = peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(HttpResult {
        rate: ok as f64 / elapsed,
        ok,
        errors,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        rss_mib: rss,
        rss_peak_mib: hwm.max(sampled),
    })
}

/// User + system CPU seconds of a process (`None`: this one), from /proc.
fn cpu_secs(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(p) => Path::new("/proc").join(p.to_string()).join("stat"),
        None => Path::new("/proc/self/stat").to_path_buf(),
    };
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    #[allow(unsafe_code)]
    // SAFETY: sysconf takes an integer and has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // utime and stime are fields 14 and 15, i.e. indexes 11 and 12 after the ')'.
    (ticks(11) + ticks(12)) / hz
}

/// (VmRSS, VmHWM) of a process in MiB, from /proc.
fn rss_of(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"))
        .unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn wait_ready(base: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(r) = reqwest::get(format!("{base}/readyz")).await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("gateway not ready within 30 s")
}

/// Seconds from the first row of `table` seen to the `want`-th.
async fn time_drain(
    pool: &sqlx::PgPool,
    table: &'static str,
    want: i64,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    loop {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(pool)
            .await?;
        if n > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if n >= want {
            return Ok(first.map_or(0.0, |f| f.elapsed().as_secs_f64()).max(1e-3));
        }
        if start.elapsed() > timeout {
            bail!("only {n} of {want} {table} rows persisted within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The same three writes a worker makes per message (ledger, task, audit), one message per
/// transaction, `concurrency` connections.
async fn one_per_transaction(url: &str, n: u64, concurrency: usize) -> anyhow::Result<f64> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(u32::try_from(concurrency)?)
        .connect(url)
        .await?;
    sqlx::query("TRUNCATE tasks, task_audit_log, inbox CASCADE")
        .execute(&pool)
        .await?;
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..concurrency {
        let (pool, next) = (pool.clone(), next.clone());
        handles.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let key = format!("api:bench:single-{i}");
                let id = envelope::task_id_for(&key);
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO inbox (message_key, fingerprint, task_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                    .bind(&key).bind(vec![0u8; 32]).bind(id).execute(&mut *tx).await?;
                sqlx::query("INSERT INTO tasks (id, title, description, repository, priority, created_by, submitted_by, message_key, status) VALUES ($1, $2, $3, 'bench', 'high', $4, 'bench', $5, 'queued')")
                    .bind(id).bind(format!("Benchmark task {i}")).bind("A task created by mhv bench.").bind(crate::db::SYSTEM_USER_ID).bind(&key)
                    .execute(&mut *tx).await?;
                sqlx::query("INSERT INTO task_audit_log (task_id, event, actor, details) VALUES ($1, 'task_created', 'bench', $2)")
                    .bind(id).bind(serde_json::json!({"title": "Benchmark task", "description": "[REDACTED (28 characters)]"}))
                    .execute(&mut *tx).await?;
                tx.commit().await?;
            }
        }));
    }
    for h in handles {
        h.await??;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    pool.close().await;
    Ok(rate)
}
