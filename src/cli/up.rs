//! `mhv up`: one command for a local stack. Uses NATS and PostgreSQL at the configured URLs
//! when something answers there; otherwise starts a nats-server (JetStream, store under the data
//! directory) and/or a throwaway PostgreSQL cluster. Then migrates, starts the gateway and two
//! workers (sibling binaries `mhv-gateway` and `mhv-worker`), submits a demo task through the
//! gateway and reads it back, prints what to paste, and on Ctrl-C stops everything it started.

use crate::config::{
    ApiKeySettings, LogFormat, Settings, WebhookRule, WebhookSecret, WebhookSource,
};
use crate::devstack::{self, nats::NatsServer, postgres::LocalCluster};
use anyhow::{bail, Context as _};
use secrecy::ExposeSecret;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Options of `mhv up`.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Where started servers keep their data, and where the generated config and demo key live.
    #[arg(long, default_value = ".mhv")]
    pub data_dir: PathBuf,
    /// Worker processes to start.
    #[arg(long, default_value_t = 2)]
    pub workers: u16,
    /// Skip the demo task.
    #[arg(long)]
    pub no_demo: bool,
    /// Exit after the demo task instead of running until Ctrl-C (for scripts and CI).
    #[arg(long)]
    pub exit_after_demo: bool,
}

struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (name, child) in self.0.iter_mut().rev() {
            devstack::terminate(child, Duration::from_secs(30));
            eprintln!("stopped {name}");
        }
    }
}

/// Runs `mhv up`.
pub async fn run(mut settings: Settings, args: UpArgs) -> anyhow::Result<()> {
    let data = std::path::absolute(&args.data_dir)?;
    std::fs::create_dir_all(&data)?;

    // NATS.
    let nats_addr = host_port(&settings.nats.url, 4222)?;
    let answering = devstack::answers(&nats_addr);
    let old = if answering {
        old_nats_version(&settings.nats.url).await
    } else {
        None
    };
    let _nats = if answering && old.is_none() {
        eprintln!(
            "using NATS at {}",
            crate::config::redact_url(&settings.nats.url)
        );
        None
    } else {
        let port = match &old {
            // Something older answers at the configured address: leave it alone and run the
            // pinned server beside it.
            Some(v) => {
                let p = devstack::free_port()?;
                eprintln!(
                    "nats-server {v} at {} is older than {}.{}; starting the pinned server on port {p} instead",
                    crate::config::redact_url(&settings.nats.url),
                    devstack::nats::MIN_VERSION.0,
                    devstack::nats::MIN_VERSION.1
                );
                p
            }
            None => nats_addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(4222),
        };
        let s = NatsServer::start(&data.join("nats"), port)?;
        eprintln!(
            "started nats-server at {} (store {})",
            s.url(),
            data.join("nats").display()
        );
        settings.nats.url = s.url();
        Some(s)
    };

    // PostgreSQL.
    let db_url = settings.database.url.expose_secret().to_owned();
    let pg_addr = host_port(&db_url, 5432)?;
    let _pg = if devstack::answers(&pg_addr) {
        eprintln!("using PostgreSQL at {pg_addr}");
        None
    } else {
        let port = pg_addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(5432);
        let c = LocalCluster::start(&data.join("pg"), port)?;
        eprintln!(
            "started a throwaway PostgreSQL cluster on port {port} ({})",
            data.join("pg").display()
        );
        Some(c)
    };
    crate::db::migrate(&settings.database).await?;
    eprintln!("migrations applied");

    // A demo API key, kept across runs.
    let key_file = data.join("demo-api-key");
    let key = match std::fs::read_to_string(&key_file) {
        Ok(k) if !k.trim().is_empty() => k.trim().to_owned(),
        _ => {
            let k = super::generate_key();
            std::fs::write(&key_file, &k)?;
            k
        }
    };
    let hash = crate::config::hash_api_key(&key);
    if !settings.gateway.api_keys.iter().any(|k| k.sha256 == hash) {
        settings.gateway.api_keys.push(ApiKeySettings {
            name: "demo".into(),
            sha256: hash,
        });
    }
    // A demo GitHub webhook source with its own secret, kept across runs.
    let hook_secret_file = data.join("demo-webhook-secret");
    let hook_secret = match std::fs::read_to_string(&hook_secret_file) {
        Ok(k) if !k.trim().is_empty() => k.trim().to_owned(),
        _ => {
            let k = super::generate_key();
            std::fs::write(&hook_secret_file, &k)?;
            k
        }
    };
    settings
        .webhooks
        .sources
        .entry(DEMO_SOURCE.into())
        .or_insert_with(|| demo_source(&hook_secret));
    // A demo repository the demo tasks run in (a git repository with one commit, kept across
    // runs), unless the configuration registers one named `demo` already.
    if !settings.repositories.contains_key(DEMO_REPOSITORY) {
        let repo = data.join("demo-repo");
        match ensure_demo_repo(&repo) {
            Ok(()) => {
                if settings.execution.worktree_root
                    == crate::registry::ExecutionSettings::default().worktree_root
                {
                    settings.execution.worktree_root =
                        data.join("worktrees").to_string_lossy().into_owned();
                }
                settings
                    .repositories
                    .insert(DEMO_REPOSITORY.into(), demo_repository(&repo));
            }
            Err(e) => eprintln!("demo repository not set up, tasks will not run: {e:#}"),
        }
    }
    // The generated file redacts inline secrets: hand every one to the services by environment.
    let mut secret_env = Vec::new();
    for src in settings.webhooks.sources.values_mut() {
        for sec in &mut src.secrets {
            if let Some(v) = sec.secret.take() {
                let var = format!("MAHAVISHNU_UP_WEBHOOK_SECRET_{}", secret_env.len());
                secret_env.push((var.clone(), v.expose_secret().to_owned()));
                sec.env = Some(var);
            }
        }
    }
    settings.log.format = LogFormat::Pretty;
    settings.validate()?;
    let config_path = data.join("up.toml");
    std::fs::write(&config_path, toml::to_string_pretty(&settings)?)?;

    let bin_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut children = Children(Vec::new());
    let spawn = |bin: &str, extra: &[(&str, String)]| -> anyhow::Result<Child> {
        let path = find_sibling(&bin_dir, bin)?;
        let mut cmd = Command::new(&path);
        cmd.arg("--config")
            .arg(&config_path)
            // The generated file redacts both URLs; pass them by environment.
            .env("MHV_DATABASE__URL", &db_url)
            .env("MHV_NATS__URL", &settings.nats.url)
            .stdin(Stdio::null());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        for (k, v) in &secret_env {
            cmd.env(k, v);
        }
        cmd.spawn()
            .with_context(|| format!("starting {}", path.display()))
    };
    children
        .0
        .push(("gateway".into(), spawn("mhv-gateway", &[])?));
    for i in 0..args.workers {
        let metrics = format!("127.0.0.1:{}", 9091 + i);
        children.0.push((
            format!("worker {}", i + 1),
            spawn("mhv-worker", &[("MHV_WORKER__METRICS_LISTEN", metrics)])?,
        ));
    }

    let base = format!("http://{}", settings.gateway.listen);
    let http = reqwest::Client::new();
    wait_ready(&http, &base, &mut children).await?;

    println!();
    println!("Mahavishnu is up.");
    println!("  gateway:   {base}");
    println!("  api key:   {key}   (also in {})", key_file.display());
    println!("  metrics:   {base}/metrics, worker metrics on 127.0.0.1:9091..");
    println!("  try:");
    println!(
        "    curl -sS -X POST {base}/v1/tasks -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -H 'Idempotency-Key: demo-1' -d '{{\"title\":\"Hello\",\"repository\":\"demo\"}}'"
    );
    println!("    curl -sS {base}/v1/tasks/<id> -H 'Authorization: Bearer {key}'");
    println!(
        "  a signed GitHub-style webhook (secret in {}):",
        hook_secret_file.display()
    );
    println!(
        "    BODY='{{\"action\":\"opened\",\"issue\":{{\"number\":1,\"title\":\"Hello\"}},\"repository\":{{\"name\":\"demo\"}}}}'"
    );
    println!(
        "    SIG=$(printf %s \"$BODY\" | openssl dgst -sha256 -hmac \"$(cat {})\" | awk '{{print $NF}}')",
        hook_secret_file.display()
    );
    println!(
        "    curl -sS -X POST {base}/v1/webhooks/{DEMO_SOURCE} -H 'X-GitHub-Event: issues' -H \"X-GitHub-Delivery: $(date +%s%N)\" -H \"X-Hub-Signature-256: sha256=$SIG\" -d \"$BODY\""
    );

    if !args.no_demo {
        let runs = settings
            .repositories
            .get(DEMO_REPOSITORY)
            .is_some_and(|r| r.executable() && r.default_action.is_some());
        let pool = crate::db::pool(&settings.database)?;
        let a = demo(&http, &base, &key).await?;
        let b = demo_webhook(&http, &base, &key, &hook_secret).await?;
        if runs {
            for id in [a, b] {
                demo_run(&http, &base, &key, &pool, &id).await?;
            }
        }
        pool.close().await;
    }
    if args.exit_after_demo {
        return Ok(());
    }
    println!("\nCtrl-C stops everything mhv up started.");
    loop {
        tokio::select! {
            () = super::shutdown_signal() => break,
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                for (name, child) in children.0.iter_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        bail!("{name} exited ({status}); stopping the stack");
                    }
                }
            }
        }
    }
    Ok(())
}

/// The version of the nats-server at `url` when it is older than we support (the consumer
/// needs 2.10+ for its several filter subjects).
async fn old_nats_version(url: &str) -> Option<String> {
    let c = tokio::time::timeout(Duration::from_secs(3), async_nats::connect(url))
        .await
        .ok()?
        .ok()?;
    let v = c.server_info().version;
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    ((major, minor) < devstack::nats::MIN_VERSION).then_some(v)
}

/// Name of the demo repository `mhv up` registers (unless the configuration has one).
pub const DEMO_REPOSITORY: &str = "demo";

/// A git repository with one commit on `main` (created once).
pub(crate) fn ensure_demo_repo(dir: &Path) -> anyhow::Result<()> {
    if dir.join(".git").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let git = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=mhv up",
                "-c",
                "user.email=mhv-up@example.invalid",
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running git (is it installed?)")?;
        if !out.status.success() {
            bail!(
                "git {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    git(&["init", "-q", "-b", "main"])?;
    std::fs::write(
        dir.join("README.md"),
        "# demo\n\nA repository `mhv up` made so its demo tasks have something to run in.\n",
    )?;
    git(&["add", "README.md"])?;
    git(&["commit", "-qm", "demo repository"])?;
    Ok(())
}

fn demo_repository(dir: &Path) -> crate::registry::Repository {
    use crate::registry::{Action, Gate, Repository};
    let mut r = Repository {
        path: dir.to_string_lossy().into_owned(),
        default_branch: "main".into(),
        default_action: Some("check".into()),
        max_concurrent: 1,
        ..Repository::default()
    };
    r.actions.insert(
        "check".into(),
        Action {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo \"task $MHV_TASK_ID, attempt $MHV_ATTEMPT, at $(git rev-parse --short HEAD)\"; wc -l README.md".into(),
            ],
            timeout_secs: 60,
            ..Action::default()
        },
    );
    r.gates.insert(
        "readme".into(),
        Gate {
            argv: vec!["test".into(), "-s".into(), "README.md".into()],
            ..Gate::default()
        },
    );
    r
}

/// Waits for a demo task to complete and prints its run.
async fn demo_run(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    pool: &sqlx::PgPool,
    id: &str,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let r = http
            .get(format!("{base}/v1/tasks/{id}"))
            .bearer_auth(key)
            .send()
            .await?;
        let t: serde_json::Value = r.json().await?;
        match t["status"].as_str() {
            Some("completed") => break,
            Some("failed" | "cancelled") => {
                bail!(
                    "demo task {id} ended {}; `mhv tasks runs {id}` shows why",
                    t["status"]
                )
            }
            _ if start.elapsed() > Duration::from_secs(30) => {
                bail!("demo task {id} did not complete within 30 s (status {}); check the worker logs", t["status"])
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let run: Option<(i32, Option<i64>, Option<String>)> = sqlx::query_as(
        "SELECT attempt, duration_ms, stdout_tail FROM task_runs
         WHERE task_id = $1::uuid AND state = 'succeeded'",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let (attempt, ms, out) = run.unwrap_or((0, None, None));
    println!(
        "demo: task {id} ran `check` in its own worktree (attempt {attempt}, {} ms, gate `readme` passed) and completed {} ms after it was read back; output: {}",
        ms.unwrap_or_default(),
        start.elapsed().as_millis(),
        out.unwrap_or_default().trim().replace('\n', " | ")
    );
    Ok(())
}

/// Name of the demo webhook source `mhv up` adds (unless the configuration has one by that name).
pub const DEMO_SOURCE: &str = "demo-github";

fn demo_source(secret: &str) -> WebhookSource {
    WebhookSource::github(
        vec![WebhookSecret::inline("demo", secret)],
        vec![WebhookRule::github_issue_opened()],
    )
}

/// The webhook half of the demo: a signed GitHub `issues` delivery becomes a task.
async fn demo_webhook(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    secret: &str,
) -> anyhow::Result<String> {
    use hmac::Mac as _;
    let delivery = uuid::Uuid::now_v7().to_string();
    let body = serde_json::to_vec(&serde_json::json!({
        "action": "opened",
        "issue": {"number": 1, "title": format!("Hello from a webhook ({delivery})")},
        "repository": {"name": "demo", "default_branch": "main"},
    }))?;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())?;
    mac.update(&body);
    let sig = hex::encode(mac.finalize().into_bytes());
    let resp = http
        .post(format!("{base}/v1/webhooks/{DEMO_SOURCE}"))
        .header("X-GitHub-Event", "issues")
        .header("X-GitHub-Delivery", &delivery)
        .header("X-Hub-Signature-256", format!("sha256={sig}"))
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await?;
    if resp.status().as_u16() != 202 {
        bail!(
            "demo webhook was not accepted: {} {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    let id =
        crate::envelope::task_id_for(&crate::webhooks::delivery::task_key(DEMO_SOURCE, &delivery));
    let start = Instant::now();
    let Some(task) = poll_read(http, &format!("{base}/v1/tasks/{id}"), key).await? else {
        bail!("demo webhook {delivery} was accepted but no task appeared within 10 s; check the worker logs and `mhv webhooks deliveries`")
    };
    println!(
        "demo: signed webhook {delivery} accepted (202) and routed into task {id} ({:?}) in {} ms",
        task["title"].as_str().unwrap_or_default(),
        start.elapsed().as_millis()
    );
    Ok(id.to_string())
}

/// GETs `url` with the key every 50 ms until it answers 2xx (its JSON body) or 10 s pass.
async fn poll_read(
    http: &reqwest::Client,
    url: &str,
    key: &str,
) -> anyhow::Result<Option<serde_json::Value>> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let r = http.get(url).bearer_auth(key).send().await?;
        if r.status().is_success() {
            return Ok(Some(r.json().await?));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(None)
}

/// The demo job: create a task through the gateway and read it back with its audit row.
async fn demo(http: &reqwest::Client, base: &str, key: &str) -> anyhow::Result<String> {
    let resp = http
        .post(format!("{base}/v1/tasks"))
        .bearer_auth(key)
        .header(
            "Idempotency-Key",
            format!("mhv-up-demo-{}", uuid::Uuid::now_v7()),
        )
        .json(&serde_json::json!({
            "title": "Hello from mhv up",
            "repository": "demo",
            "priority": "high",
            "description": "A demo task; the audit log shows this text redacted.",
        }))
        .send()
        .await?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await?;
    if status.as_u16() != 202 {
        bail!("demo task was not accepted: {status} {body}");
    }
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    let start = Instant::now();
    let Some(audit) = poll_read(http, &format!("{base}/v1/tasks/{id}/audit"), key).await? else {
        bail!("demo task {id} was accepted but not persisted within 10 s; check the worker logs")
    };
    println!(
        "\ndemo: task {id} accepted (202) and persisted in {} ms with audit: {audit}",
        start.elapsed().as_millis()
    );
    Ok(id)
}

async fn wait_ready(
    http: &reqwest::Client,
    base: &str,
    children: &mut Children,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        for (name, child) in children.0.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{name} exited during start-up ({status})");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the gateway did not become ready within 60 s")
}

fn find_sibling(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let beside = dir.join(name);
    if beside.is_file() {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
        .with_context(|| {
            format!("`{name}` is neither beside mhv ({}) nor on PATH; build it with `cargo build --workspace`", dir.display())
        })
}

/// `host:port` of a URL such as `nats://h:4222` or `postgres://u@h:5432/db` (first host only).
pub fn host_port(url: &str, default_port: u16) -> anyhow::Result<String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let rest = rest.split(['/', '?', ',']).next().unwrap_or(rest);
    let hostport = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    if hostport.is_empty() {
        bail!("no host in {url:?}");
    }
    Ok(
        if hostport
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            hostport.to_owned()
        } else {
            format!("{hostport}:{default_port}")
        },
    )
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn host_port_of_urls() {
        assert_eq!(
            host_port("nats://127.0.0.1:4222", 1).unwrap(),
            "127.0.0.1:4222"
        );
        assert_eq!(host_port("nats://a:1,nats://b:2", 1).unwrap(), "a:1");
        assert_eq!(
            host_port("postgres://postgres@127.0.0.1:5432/x", 1).unwrap(),
            "127.0.0.1:5432"
        );
        assert_eq!(
            host_port("postgres://u:p@db/x?sslmode=disable", 5432).unwrap(),
            "db:5432"
        );
    }
}
