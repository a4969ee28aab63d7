//! Shared test harness: a real nats-server (random port, own store, killable), a fresh migrated
//! PostgreSQL database, the gateway on 127.0.0.1:0 and workers in-process or as real processes.
#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use mahavishnu::config::{ApiKeySettings, LogFormat, Settings};
use mahavishnu::devstack::nats::NatsServer;
use mahavishnu::devstack::postgres::TestDatabase;
use secrecy::SecretString;
use sqlx::PgPool;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const API_KEY: &str = "test-key-0123456789";

pub struct Gateway {
    pub addr: SocketAddr,
    stop: CancellationToken,
    join: JoinHandle<anyhow::Result<()>>,
}

pub struct Worker {
    stop: CancellationToken,
    join: JoinHandle<anyhow::Result<()>>,
}

pub struct TestStack {
    pub nats: NatsServer,
    pub db: TestDatabase,
    pub pool: PgPool,
    pub settings: Settings,
    pub http: reqwest::Client,
    pub gateway: Option<Gateway>,
    pub workers: Vec<Worker>,
    pub dir: tempfile::TempDir,
}

/// Settings for tests: short ack wait so redeliveries happen within a test's patience.
pub fn test_settings(nats_url: &str, db_url: &str) -> Settings {
    let mut s = Settings::default();
    s.nats.url = nats_url.to_owned();
    s.nats.request_timeout_ms = 2_000;
    s.nats.publish_ack_timeout_ms = 2_000;
    s.nats.consumer.ack_wait_secs = 3;
    s.nats.consumer.backoff_secs = vec![];
    s.database.url = SecretString::from(db_url.to_owned());
    s.database.statement_timeout_ms = 2_000;
    s.database.max_connections = 5;
    s.database.acquire_timeout_ms = 1_000;
    s.worker.metrics_listen = String::new();
    s.worker.nak_delay_ms = 200;
    s.worker.shutdown_grace_secs = 10;
    s.gateway.listen = "127.0.0.1:0".into();
    s.gateway.api_keys = vec![ApiKeySettings {
        name: "tester".into(),
        sha256: mahavishnu::config::hash_api_key(API_KEY),
    }];
    s.log.format = LogFormat::Pretty;
    s.log.filter = "warn".into();
    s
}

impl TestStack {
    /// NATS and a database, nothing else running yet.
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    /// Same, with settings adjusted before anything starts.
    pub async fn with(adjust: impl FnOnce(&mut Settings)) -> Self {
        mahavishnu::telemetry::init(
            &mahavishnu::config::LogSettings {
                format: LogFormat::Pretty,
                filter: "warn".into(),
            },
            std::io::stderr,
        );
        let dir = tempfile::tempdir().unwrap();
        let nats = NatsServer::start(&dir.path().join("nats"), 0).unwrap();
        let db = TestDatabase::create().await.unwrap();
        let mut settings = test_settings(&nats.url(), &db.url);
        adjust(&mut settings);
        settings.validate().unwrap();
        let pool = PgPool::connect(&db.url).await.unwrap();
        Self {
            nats,
            db,
            pool,
            settings,
            http: reqwest::Client::new(),
            gateway: None,
            workers: Vec::new(),
            dir,
        }
    }

    /// Gateway and `workers` in-process workers, waiting until the gateway is ready.
    pub async fn start(adjust: impl FnOnce(&mut Settings), workers: usize) -> Self {
        let mut s = Self::with(adjust).await;
        s.spawn_gateway().await;
        for _ in 0..workers {
            s.spawn_worker();
        }
        s.wait_ready().await;
        s
    }

    pub async fn spawn_gateway(&mut self) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let settings = self.settings.clone();
        let join = tokio::spawn(async move {
            mahavishnu_gateway::run(settings, listener, async move { s.cancelled().await }).await
        });
        self.gateway = Some(Gateway { addr, stop, join });
    }

    pub fn spawn_worker(&mut self) {
        let stop = CancellationToken::new();
        let settings = self.settings.clone();
        let s = stop.clone();
        let join = tokio::spawn(async move { mahavishnu_workers::run(settings, s).await });
        self.workers.push(Worker { stop, join });
    }

    /// Stops in-process workers gracefully and waits for them.
    pub async fn stop_workers(&mut self) {
        for w in self.workers.drain(..) {
            w.stop.cancel();
            w.join.await.unwrap().unwrap();
        }
    }

    pub async fn stop_gateway(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.stop.cancel();
            g.join.await.unwrap().unwrap();
        }
    }

    /// A config file for worker processes (the database URL goes by environment).
    pub fn settings_file(&self) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("settings-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&path, toml::to_string(&self.settings).unwrap()).unwrap();
        path
    }

    /// A real `mhv-worker` process, killed if the test ends first.
    pub fn spawn_worker_process(&self) -> ChildGuard {
        self.spawn_worker_process_with(&[])
    }

    pub fn spawn_worker_process_with(&self, env: &[(&str, String)]) -> ChildGuard {
        let mut cmd = Command::new(sibling_bin("mhv-worker"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        ChildGuard(
            cmd.arg("--config")
                .arg(self.settings_file())
                .env("MHV_DATABASE__URL", &self.db.url)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// Waits until the task stream exists (created by whichever process starts first).
    pub async fn wait_stream(&self) {
        let js = async_nats::jetstream::new(self.nats_client().await);
        let start = Instant::now();
        while js
            .get_stream(&self.settings.nats.stream.name)
            .await
            .is_err()
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "stream never appeared"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn base(&self) -> String {
        format!(
            "http://{}",
            self.gateway.as_ref().expect("gateway not started").addr
        )
    }

    pub async fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if let Ok(r) = self
                .http
                .get(format!("{}/readyz", self.base()))
                .send()
                .await
            {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "gateway never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// POST /v1/tasks with the test key.
    pub async fn create(
        &self,
        body: &serde_json::Value,
        idempotency_key: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(format!("{}/v1/tasks", self.base()))
            .bearer_auth(API_KEY)
            .json(body);
        if let Some(k) = idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        req.send().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base()))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap()
    }

    /// Polls until the SQL count reaches `want` or `timeout` passes; returns the last count.
    pub async fn wait_count(&self, sql: &str, want: i64, timeout: Duration) -> i64 {
        let start = Instant::now();
        loop {
            let n = self.count(sql).await;
            if n >= want || start.elapsed() > timeout {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// The workers' consumer's current info, if the consumer exists.
    pub async fn consumer_info(&self) -> Option<async_nats::jetstream::consumer::Info> {
        let js = async_nats::jetstream::new(self.nats_client().await);
        let mut c = js
            .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                &self.settings.nats.consumer.durable_name,
                &self.settings.nats.stream.name,
            )
            .await
            .ok()?;
        c.info().await.ok().cloned()
    }

    /// Asserts that the consumer has nothing pending or unacknowledged within `timeout`.
    pub async fn assert_drained(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Some(i) = self.consumer_info().await {
                if i.num_pending == 0 && i.num_ack_pending == 0 {
                    return;
                }
                assert!(
                    start.elapsed() < timeout,
                    "not drained: {} pending, {} unacknowledged",
                    i.num_pending,
                    i.num_ack_pending
                );
            }
            assert!(start.elapsed() < timeout, "consumer not found");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until some worker has a pull request waiting on the consumer (it is consuming).
    pub async fn wait_pulling(&self) {
        let start = Instant::now();
        loop {
            if self
                .consumer_info()
                .await
                .is_some_and(|i| i.num_waiting > 0)
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no worker is pulling"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs `mhv --config <config> <args>` against this stack's database; returns whether it
    /// succeeded and its stdout and stderr. Async: in-process workers keep running meanwhile.
    pub async fn mhv(&self, config: &std::path::Path, args: &[&str]) -> (bool, String) {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mhv"))
            .arg("--config")
            .arg(config)
            .args(args)
            .env("MHV_DATABASE__URL", &self.db.url)
            .env("RUST_LOG", "warn")
            .output()
            .await
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// A NATS client for publishing straight to the subject.
    pub async fn nats_client(&self) -> async_nats::Client {
        async_nats::connect(self.nats.url()).await.unwrap()
    }
}

/// A child process that is killed when dropped, so a failing test leaks no worker.
pub struct ChildGuard(pub Child);

impl std::ops::Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Path of a binary built beside this test's `mhv` (requires `--workspace` builds).
pub fn sibling_bin(name: &str) -> PathBuf {
    let mhv = PathBuf::from(env!("CARGO_BIN_EXE_mhv"));
    let path = mhv.parent().unwrap().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo nextest run --workspace` (scripts/test) so every binary is built",
        path.display()
    );
    path
}

pub fn task(title: &str) -> serde_json::Value {
    serde_json::json!({ "title": title, "repository": "core", "description": "secret plan", "metadata": {"k": "v"} })
}
