//! Typed configuration: compiled-in defaults, then an optional TOML file, then `MHV_`
//! environment variables (`__` separates levels: `MHV_DATABASE__URL`, `MHV_NATS__CONSUMER__ACK_WAIT_SECS`).
//!
//! [`Settings::validate`] checks ranges and cross-field rules before anything starts, so a bad
//! setting stops a process at start-up with `MHV-001` and the setting's name, not at 3 a.m.
//! `config.default.toml` at the repository root lists every setting with its default.

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// Room the gateway's envelope needs beyond the request body.
pub const ENVELOPE_OVERHEAD_BYTES: usize = 4096;

/// `MHV_*` variables that are not settings (lower-case, prefix stripped).
pub const NON_SETTING_VARS: &[&str] = &["config", "nats_server", "test_database_url"];

/// All settings of every Mahavishnu process. Each process reads the parts it needs.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// NATS connection, stream and consumer.
    pub nats: NatsSettings,
    /// PostgreSQL (workers and `mhv` only; the gateway never reads it).
    pub database: DatabaseSettings,
    /// HTTP gateway.
    pub gateway: GatewaySettings,
    /// Worker processes.
    pub worker: WorkerSettings,
    /// Webhook sources, their secrets and routing rules.
    pub webhooks: WebhookSettings,
    /// How tasks are executed.
    pub execution: crate::registry::ExecutionSettings,
    /// Repositories the fleet knows and what it may run in them; empty: record-only.
    pub repositories: std::collections::BTreeMap<String, crate::registry::Repository>,
    /// Logging.
    pub log: LogSettings,
}

/// NATS settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated. May carry credentials (`nats://user:pass@host`), so it
    /// is redacted wherever it is printed ([`redact_url`]).
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: String,
    /// How long a publish waits for JetStream's acknowledgement before the gateway answers 503.
    pub publish_ack_timeout_ms: u64,
    /// How long the gateway waits for a worker to answer a read.
    pub request_timeout_ms: u64,
    /// The task stream.
    pub stream: StreamSettings,
    /// The workers' shared durable consumer.
    pub consumer: ConsumerSettings,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            publish_ack_timeout_ms: 5_000,
            request_timeout_ms: 2_000,
            stream: StreamSettings::default(),
            consumer: ConsumerSettings::default(),
        }
    }
}

/// JetStream stream settings for the task stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamSettings {
    /// Stream name.
    pub name: String,
    /// JetStream duplicate window for `Nats-Msg-Id`. Only a first line of defence: the database
    /// ledger is the guard that does not forget.
    pub duplicate_window_secs: u64,
    /// Upper bound on stored bytes; when full, new publishes are refused (the gateway answers
    /// 503) rather than old, unprocessed tasks being dropped.
    pub max_bytes: i64,
    /// Largest single message.
    pub max_message_bytes: i32,
    /// Replicas (1 for a single server, 3 for a cluster).
    pub replicas: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            name: "MHV_TASKS".into(),
            duplicate_window_secs: 120,
            max_bytes: 1 << 30,
            max_message_bytes: 1 << 20,
            replicas: 1,
        }
    }
}

/// Durable consumer settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerSettings {
    /// Durable name shared by every worker replica.
    pub durable_name: String,
    /// How long a delivery may stay unacknowledged before JetStream redelivers it.
    pub ack_wait_secs: u64,
    /// Deliveries before JetStream gives up on a message. Only -1 (never give up) is accepted
    /// for now; see [`Settings::validate`].
    /// Persisting an accepted task must outlast any database outage: messages that can never
    /// succeed are dead-lettered and terminated by the workers themselves, so only passing
    /// failures are ever redelivered.
    pub max_deliver: i64,
    /// Redelivery delays after an ack-wait expiry (JetStream `BackOff`); empty means `ack_wait`.
    pub backoff_secs: Vec<u64>,
    /// Unacknowledged messages the consumer allows across all workers.
    pub max_ack_pending: i64,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            durable_name: "mhv-workers".into(),
            ack_wait_secs: 30,
            max_deliver: -1,
            backoff_secs: vec![30, 60, 120, 300],
            max_ack_pending: 20_000,
        }
    }
}

/// PostgreSQL settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Connection URL. Secret: it may carry a password; never logged.
    #[serde(serialize_with = "serialize_redacted")]
    pub url: SecretString,
    /// Pool size per process.
    pub max_connections: u32,
    /// How long to wait for a pooled connection.
    pub acquire_timeout_ms: u64,
    /// Server-side `statement_timeout`.
    pub statement_timeout_ms: u64,
    /// Server-side `idle_in_transaction_session_timeout`: a stuck worker cannot hold locks forever.
    pub idle_in_transaction_timeout_ms: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("postgres://postgres@127.0.0.1:5432/mahavishnu"),
            max_connections: 10,
            acquire_timeout_ms: 5_000,
            statement_timeout_ms: 15_000,
            idle_in_transaction_timeout_ms: 60_000,
        }
    }
}

fn serialize_redacted<S: serde::Serializer>(s: &SecretString, ser: S) -> Result<S::Ok, S::Error> {
    // Figment needs defaults serialised; the default URL carries no password. Any other value is
    // redacted so that dumping settings never leaks one.
    let v = s.expose_secret();
    if v == "postgres://postgres@127.0.0.1:5432/mahavishnu" {
        ser.serialize_str(v)
    } else {
        ser.serialize_str("[REDACTED]")
    }
}

/// One API key: a name (the principal) and the SHA-256 of the key. Keys themselves are never
/// stored in configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySettings {
    /// Principal name, `^[A-Za-z0-9_-]{1,64}$`; scopes idempotency keys and appears in audit rows.
    pub name: String,
    /// Lower-case hex SHA-256 of the key (`mhv keys hash` prints it).
    pub sha256: String,
}

/// Gateway settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySettings {
    /// Address to listen on.
    pub listen: String,
    /// A client must finish sending its request headers within this time (slowloris guard).
    pub header_read_timeout_ms: u64,
    /// Whole-request deadline.
    pub request_timeout_ms: u64,
    /// Largest request body on the task API.
    pub body_limit_bytes: usize,
    /// Concurrent requests in flight before the gateway sheds load with 503.
    pub max_in_flight_requests: usize,
    /// API keys allowed to call the task API.
    pub api_keys: Vec<ApiKeySettings>,
    /// Webhook bodies the gateway may hold in memory at once, across all requests. Each request
    /// reserves from it as its body arrives; one that cannot is answered 503 (MHV-013).
    pub webhook_max_buffered_bytes: usize,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            header_read_timeout_ms: 5_000,
            request_timeout_ms: 15_000,
            body_limit_bytes: 64 * 1024,
            max_in_flight_requests: 4_096,
            api_keys: Vec::new(),
            webhook_max_buffered_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Worker settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// Most messages written in one transaction.
    pub batch_size: usize,
    /// Transactions in flight at once per worker process.
    pub max_in_flight_batches: usize,
    /// Delay before the first redelivery of a message that failed for a passing reason; later
    /// ones back off exponentially, with jitter, up to `nak_max_delay_ms`.
    pub nak_delay_ms: u64,
    /// Longest redelivery delay.
    pub nak_max_delay_ms: u64,
    /// Address of the worker's `/metrics` and `/healthz` endpoint; empty disables it.
    pub metrics_listen: String,
    /// On SIGTERM, how long in-flight work may take before the worker exits anyway (unacked
    /// messages are then redelivered to another worker).
    pub shutdown_grace_secs: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            batch_size: 128,
            max_in_flight_batches: 4,
            nak_delay_ms: 1_000,
            nak_max_delay_ms: 60_000,
            metrics_listen: "127.0.0.1:9091".into(),
            shutdown_grace_secs: 25,
        }
    }
}

/// Webhook ingestion settings (see docs/webhooks.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    /// Days the delivery ledger (PostgreSQL rows and the JetStream KV front) remembers a
    /// delivery. A delivery older than this is no longer recognised as a duplicate.
    pub ledger_retention_days: u32,
    /// JetStream KV bucket the gateway checks synchronously (duplicate or tampered delivery id).
    pub ledger_bucket: String,
    /// JetStream object store bucket for bodies too large for one message (claim-check).
    pub body_bucket: String,
    /// How long a claim-checked body is kept if no worker deletes it (workers delete it once the
    /// delivery is committed; this bounds what an outage or a lost publish can leave behind).
    pub claim_check_max_age_hours: u64,
    /// Most bytes the body bucket holds; when full, large deliveries are answered 503 (MHV-007)
    /// instead of filling the JetStream store. -1: unlimited.
    pub body_bucket_max_bytes: i64,
    /// Sources by name: `POST /v1/webhooks/{name}`.
    pub sources: std::collections::BTreeMap<String, WebhookSource>,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            ledger_retention_days: 30,
            ledger_bucket: "MHV_WEBHOOK_LEDGER".into(),
            body_bucket: "MHV_WEBHOOK_BODIES".into(),
            claim_check_max_age_hours: 7 * 24,
            body_bucket_max_bytes: 8 << 30,
            sources: std::collections::BTreeMap::new(),
        }
    }
}

/// How a sender signs its deliveries.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WebhookScheme {
    /// `X-Hub-Signature-256` over the body; `X-GitHub-Delivery`, `X-GitHub-Event`.
    Github,
    /// `X-Gitlab-Token`; `X-Gitlab-Event-UUID`, `X-Gitlab-Event`.
    Gitlab,
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature`.
    Standard,
}

impl WebhookScheme {
    /// The configuration spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Github => "github",
            Self::Gitlab => "gitlab",
            Self::Standard => "standard",
        }
    }
}

/// One webhook source.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSource {
    /// Signature scheme.
    pub scheme: WebhookScheme,
    /// Active secrets (several during a rotation). Each verifies until its `expires_at`.
    pub secrets: Vec<WebhookSecret>,
    /// Largest body accepted, enforced while reading. GitHub caps payloads at 25 MB.
    #[serde(default = "default_webhook_body_limit")]
    pub body_limit_bytes: usize,
    /// Standard Webhooks: largest distance between the signed timestamp and now, either way.
    #[serde(default = "default_webhook_tolerance")]
    pub tolerance_secs: u64,
    /// Routing rules, tried in order; the first that matches makes the task.
    #[serde(default)]
    pub rules: Vec<WebhookRule>,
}

impl WebhookSource {
    /// A GitHub source with the default limits.
    pub fn github(secrets: Vec<WebhookSecret>, rules: Vec<WebhookRule>) -> Self {
        Self {
            scheme: WebhookScheme::Github,
            secrets,
            body_limit_bytes: default_webhook_body_limit(),
            tolerance_secs: default_webhook_tolerance(),
            rules,
        }
    }
}

fn default_webhook_body_limit() -> usize {
    25 * 1024 * 1024
}
fn default_webhook_tolerance() -> u64 {
    300
}

/// One secret of a source: inline (`secret`) or read from an environment variable (`env`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSecret {
    /// Operator-chosen id, reported in metrics and the delivery ledger (never the secret).
    pub id: String,
    /// The secret itself (Standard Webhooks: `whsec_<base64>`).
    #[serde(default, serialize_with = "serialize_opt_redacted")]
    pub secret: Option<SecretString>,
    /// Name of an environment variable holding the secret (not an `MHV_` one).
    #[serde(default)]
    pub env: Option<String>,
    /// After this instant the secret verifies nothing (RFC 3339).
    #[serde(default)]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSecret")
            .field("id", &self.id)
            .field("secret", &self.secret.as_ref().map(|_| "[REDACTED]"))
            .field("env", &self.env)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl WebhookSecret {
    /// A secret given inline.
    pub fn inline(id: &str, value: &str) -> Self {
        Self {
            id: id.to_owned(),
            secret: Some(SecretString::from(value.to_owned())),
            env: None,
            expires_at: None,
        }
    }

    /// A secret read from an environment variable.
    pub fn from_env(id: &str, var: &str) -> Self {
        Self {
            id: id.to_owned(),
            secret: None,
            env: Some(var.to_owned()),
            expires_at: None,
        }
    }

    /// The secret's value: inline, or from its environment variable.
    pub fn value(&self) -> Result<String, ConfigError> {
        match (&self.secret, &self.env) {
            (Some(s), None) => Ok(s.expose_secret().to_owned()),
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Ok(v),
                _ => Err(ConfigError(format!(
                    "webhook secret {:?}: environment variable {var} is not set",
                    self.id
                ))),
            },
            _ => Err(ConfigError(format!(
                "webhook secret {:?}: set exactly one of `secret` and `env`",
                self.id
            ))),
        }
    }
}

fn serialize_opt_redacted<S: serde::Serializer>(
    s: &Option<SecretString>,
    ser: S,
) -> Result<S::Ok, S::Error> {
    match s {
        Some(_) => ser.serialize_some("[REDACTED]"),
        None => ser.serialize_none(),
    }
}

/// A routing rule: which deliveries it matches and the task it makes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookRule {
    /// Rule name (recorded with each delivery it routes).
    pub name: String,
    /// Event name: `X-GitHub-Event` (`issues`), `X-Gitlab-Event` (`Issue Hook`), or the body's
    /// `type` for Standard Webhooks.
    pub event: String,
    /// Any of these actions (GitHub `action`, GitLab `object_attributes.action`, Standard
    /// `data.action`); empty: any.
    #[serde(default)]
    pub actions: Vec<String>,
    /// Any of these labels on the issue or merge/pull request; empty: any.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Any of these branches (`$default` is the repository's default branch); empty: any.
    #[serde(default)]
    pub branches: Vec<String>,
    /// The task to create.
    pub task: WebhookTaskTemplate,
}

impl WebhookRule {
    /// The rule `mhv up` and `mhv bench` use: a GitHub `issues` delivery with action `opened`
    /// becomes the task "Issue #N: title" in the repository of the same name.
    pub fn github_issue_opened() -> Self {
        Self {
            name: "issue-opened".into(),
            event: "issues".into(),
            actions: vec!["opened".into()],
            labels: vec![],
            branches: vec![],
            task: WebhookTaskTemplate {
                title: "Issue #{issue.number}: {issue.title}".into(),
                repository: "{repository.name}".into(),
                description: None,
                priority: None,
                action: None,
                tags: vec!["github".into()],
            },
        }
    }
}

/// A task template. `{dotted.path}` is replaced by that field of the JSON payload
/// (`{issue.title}`, `{repository.name}`); `{{` and `}}` are literal braces.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookTaskTemplate {
    /// Title template.
    pub title: String,
    /// Repository template; the result is validated like any task's repository.
    pub repository: String,
    /// Description template.
    #[serde(default)]
    pub description: Option<String>,
    /// low | medium | high | critical.
    #[serde(default)]
    pub priority: Option<String>,
    /// Named action of the repository to run (stored in the task's metadata as `action`).
    #[serde(default)]
    pub action: Option<String>,
    /// Tags (literal).
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Logging settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `json` (production) or `pretty` (a terminal).
    pub format: LogFormat,
    /// A `tracing` filter such as `info,mahavishnu=debug`; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            filter: "info".into(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Pretty,
}

/// A configuration problem (`MHV-001`).
#[derive(Debug, thiserror::Error)]
#[error("MHV-001 configuration error: {0}")]
pub struct ConfigError(pub String);

impl Settings {
    /// Loads defaults → `file` (if given) → `MHV_*` environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::figment(file)
            .extract::<Settings>()
            .map_err(|e| ConfigError(e.to_string()))
            .and_then(|s| s.validate().map(|()| s))
    }

    /// The layered provider, for callers that add their own layers (tests).
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut f = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = file {
            f = f.merge(Toml::file_exact(path));
        }
        // MHV_CONFIG names the file; MHV_NATS_SERVER and MHV_TEST_DATABASE_URL are for tools and
        // tests. Every other MHV_ variable must be a setting: a typo is refused, not ignored.
        f.merge(Env::prefixed("MHV_").split("__").ignore(NON_SETTING_VARS))
    }

    /// Checks ranges and cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        let n = &self.nats;
        if n.url.trim().is_empty() {
            return err("nats.url must not be empty".into());
        }
        if n.publish_ack_timeout_ms == 0 || n.request_timeout_ms == 0 {
            return err(
                "nats.publish_ack_timeout_ms and nats.request_timeout_ms must be > 0".into(),
            );
        }
        if n.url
            .split(',')
            .any(|u| u.trim().parse::<async_nats::ServerAddr>().is_err())
        {
            return err(format!(
                "nats.url {:?} must be a comma-separated list of NATS URLs",
                redact_url(&n.url)
            ));
        }
        if !crate::task::validate::is_valid_repository(&n.stream.name, 64) {
            return err(format!(
                "nats.stream.name {:?} must match ^[A-Za-z0-9_-]{{1,64}}$",
                n.stream.name
            ));
        }
        if n.stream.duplicate_window_secs == 0 {
            return err("nats.stream.duplicate_window_secs must be > 0".into());
        }
        if n.stream.max_message_bytes < 1024 {
            return err("nats.stream.max_message_bytes must be at least 1024".into());
        }
        if n.stream.max_bytes != -1 && n.stream.max_bytes < i64::from(n.stream.max_message_bytes) {
            return err(
                "nats.stream.max_bytes must be -1 (unlimited) or at least max_message_bytes".into(),
            );
        }
        if !(1..=5).contains(&n.stream.replicas) {
            return err("nats.stream.replicas must be within 1..=5".into());
        }
        let c = &n.consumer;
        if !crate::task::validate::is_valid_repository(&c.durable_name, 64) {
            return err("nats.consumer.durable_name must match ^[A-Za-z0-9_-]{1,64}$".into());
        }
        if c.ack_wait_secs == 0 {
            return err("nats.consumer.ack_wait_secs must be > 0".into());
        }
        // Past MaxDeliver JetStream neither removes nor redelivers a message; the workers
        // capture its advisory into the dead-letter store (workers/src/advisories.rs). The server
        // refuses a limit not above the number of backoff entries.
        let min = (c.backoff_secs.len() as i64 + 1).max(2);
        if c.max_deliver != -1 && c.max_deliver < min {
            return err(format!(
                "nats.consumer.max_deliver is {}; use -1 (never stop) or at least {min} (2, and more than the {} backoff_secs entries)",
                c.max_deliver,
                c.backoff_secs.len()
            ));
        }
        if let Some(b) = c.backoff_secs.iter().find(|b| **b < c.ack_wait_secs) {
            return err(format!(
                "nats.consumer.backoff_secs entry {b} is shorter than ack_wait_secs ({}): JetStream uses backoff entries as the ack deadline of later deliveries",
                c.ack_wait_secs
            ));
        }
        let d = &self.database;
        if d.max_connections == 0 || d.acquire_timeout_ms == 0 {
            return err(
                "database.max_connections and database.acquire_timeout_ms must be > 0".into(),
            );
        }
        if d.statement_timeout_ms == 0 || d.idle_in_transaction_timeout_ms == 0 {
            return err("database timeouts must be > 0".into());
        }
        let w = &self.worker;
        if !(1..=1_000).contains(&w.batch_size) {
            return err("worker.batch_size must be within 1..=1000".into());
        }
        if w.max_in_flight_batches == 0 {
            return err("worker.max_in_flight_batches must be > 0".into());
        }
        if w.max_in_flight_batches as u64 >= u64::from(d.max_connections) {
            return err(format!(
                "worker.max_in_flight_batches ({}) must be below database.max_connections ({}): the rest of the pool serves reads",
                w.max_in_flight_batches, d.max_connections
            ));
        }
        if w.nak_delay_ms == 0 || w.nak_max_delay_ms < w.nak_delay_ms {
            return err("worker.nak_delay_ms must be > 0 and at most worker.nak_max_delay_ms (a NAK without delay redelivers at once)".into());
        }
        if w.shutdown_grace_secs >= c.ack_wait_secs.saturating_mul(10) {
            // Not fatal in itself, but a sign of a misread unit.
            return err("worker.shutdown_grace_secs is implausibly large (≥ 10 × ack_wait)".into());
        }
        // A batch's transaction must be able to finish before its messages are redelivered.
        if d.statement_timeout_ms >= c.ack_wait_secs.saturating_mul(1000) {
            return err(format!(
                "database.statement_timeout_ms ({}) must be shorter than nats.consumer.ack_wait_secs ({} s)",
                d.statement_timeout_ms, c.ack_wait_secs
            ));
        }
        let g = &self.gateway;
        if g.listen.parse::<std::net::SocketAddr>().is_err() {
            return err(format!(
                "gateway.listen {:?} is not an address such as 0.0.0.0:8080",
                g.listen
            ));
        }
        if !self.worker.metrics_listen.is_empty()
            && self
                .worker
                .metrics_listen
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return err("worker.metrics_listen must be an address or empty".into());
        }
        if g.body_limit_bytes < 1024 {
            return err("gateway.body_limit_bytes must be at least 1024".into());
        }
        // The envelope adds the principal, a timestamp and field names to the body.
        if g.body_limit_bytes.saturating_add(ENVELOPE_OVERHEAD_BYTES)
            > usize::try_from(n.stream.max_message_bytes).unwrap_or(0)
        {
            return err(format!(
                "gateway.body_limit_bytes ({}) plus {ENVELOPE_OVERHEAD_BYTES} bytes of envelope must fit nats.stream.max_message_bytes ({}), or accepted-size bodies would be refused by JetStream",
                g.body_limit_bytes, n.stream.max_message_bytes
            ));
        }
        if g.header_read_timeout_ms == 0 || g.request_timeout_ms == 0 {
            return err("gateway timeouts must be > 0".into());
        }
        if n.publish_ack_timeout_ms >= g.request_timeout_ms
            || n.request_timeout_ms >= g.request_timeout_ms
        {
            return err(format!(
                "nats.publish_ack_timeout_ms ({}) and nats.request_timeout_ms ({}) must be shorter than gateway.request_timeout_ms ({}), so a slow broker is reported as such",
                n.publish_ack_timeout_ms, n.request_timeout_ms, g.request_timeout_ms
            ));
        }
        if let Some((name, _)) = self
            .webhooks
            .sources
            .iter()
            // Compared in KiB: the budget is counted in KiB permits.
            .find(|(_, src)| {
                src.body_limit_bytes.div_ceil(1024) > g.webhook_max_buffered_bytes / 1024
            })
        {
            return err(format!(
                "webhooks.sources.{name}.body_limit_bytes exceeds gateway.webhook_max_buffered_bytes ({}): its largest deliveries could never be accepted",
                g.webhook_max_buffered_bytes
            ));
        }
        if g.max_in_flight_requests == 0 {
            return err("gateway.max_in_flight_requests must be > 0".into());
        }
        let mut names = std::collections::HashSet::new();
        for k in &g.api_keys {
            if !crate::task::validate::is_valid_repository(&k.name, 64) {
                return err(format!(
                    "gateway.api_keys name {:?} must match ^[A-Za-z0-9_-]{{1,64}}$",
                    k.name
                ));
            }
            if k.sha256.len() != 64
                || !k
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                return err(format!(
                    "gateway.api_keys {:?}: sha256 must be 64 lower-case hex characters (`mhv keys hash` prints it)",
                    k.name
                ));
            }
            if !names.insert(&k.name) {
                return err(format!("gateway.api_keys name {:?} appears twice", k.name));
            }
        }
        crate::registry::validate(&self.execution, &self.repositories).map_err(ConfigError)?;
        self.validate_webhooks()
    }

    fn validate_webhooks(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        let w = &self.webhooks;
        if w.ledger_retention_days == 0 {
            return err("webhooks.ledger_retention_days must be > 0".into());
        }
        if w.claim_check_max_age_hours < 24 {
            return err("webhooks.claim_check_max_age_hours must be at least 24: a worker outage longer than it loses queued large deliveries".into());
        }
        if w.body_bucket_max_bytes != -1 && w.body_bucket_max_bytes < 64 * 1024 * 1024 {
            return err(
                "webhooks.body_bucket_max_bytes must be -1 (unlimited) or at least 64 MiB".into(),
            );
        }
        for (field, bucket) in [
            ("ledger_bucket", &w.ledger_bucket),
            ("body_bucket", &w.body_bucket),
        ] {
            if !crate::task::validate::is_valid_repository(bucket, 64) {
                return err(format!(
                    "webhooks.{field} must match ^[A-Za-z0-9_-]{{1,64}}$"
                ));
            }
        }
        for (name, src) in &w.sources {
            let at = format!("webhooks.sources.{name}");
            if !crate::task::validate::is_valid_repository(name, 64) {
                return err(format!(
                    "{at}: the source name must match ^[A-Za-z0-9_-]{{1,64}}$"
                ));
            }
            if src.secrets.is_empty() {
                return err(format!("{at}.secrets must list at least one secret"));
            }
            let mut ids = std::collections::HashSet::new();
            for sec in &src.secrets {
                if sec.id.is_empty()
                    || sec.id.len() > 64
                    || !sec
                        .id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
                {
                    return err(format!(
                        "{at}.secrets id {:?} must be 1-64 of A-Z a-z 0-9 _ - .",
                        sec.id
                    ));
                }
                if !ids.insert(&sec.id) {
                    return err(format!("{at}.secrets id {:?} appears twice", sec.id));
                }
                if let Some(var) = &sec.env {
                    if var.to_ascii_uppercase().starts_with("MHV_") {
                        return err(format!("{at}.secrets {:?}: env {var} must not start with MHV_ (those are settings)", sec.id));
                    }
                }
                if sec.secret.is_some() == sec.env.is_some() {
                    return err(format!(
                        "{at}.secrets {:?}: set exactly one of `secret` and `env`",
                        sec.id
                    ));
                }
                if let (Some(s), WebhookScheme::Standard) = (&sec.secret, src.scheme) {
                    if crate::webhooks::Secret::standard(&sec.id, s.expose_secret(), None).is_none()
                    {
                        return err(format!("{at}.secrets {:?}: a Standard Webhooks secret is whsec_ followed by base64", sec.id));
                    }
                }
            }
            if src.body_limit_bytes < 1024 || src.body_limit_bytes > 256 * 1024 * 1024 {
                return err(format!(
                    "{at}.body_limit_bytes must be within 1 KiB..=256 MiB"
                ));
            }
            if src.tolerance_secs == 0 || src.tolerance_secs > 86_400 {
                return err(format!("{at}.tolerance_secs must be within 1..=86400"));
            }
            let mut rules = std::collections::HashSet::new();
            for r in &src.rules {
                if !rules.insert(&r.name) {
                    return err(format!("{at}.rules name {:?} appears twice", r.name));
                }
                if let Err(e) = crate::webhooks::route::check_rule(r) {
                    return err(format!("{at}.rules {:?}: {e}", r.name));
                }
            }
        }
        Ok(())
    }

    /// The database URL (secret).
    pub fn database_url(&self) -> &str {
        self.database.url.expose_secret()
    }
}

/// Milliseconds to a `Duration`.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Replaces the user-info part of every URL in a comma-separated list with `***`.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(s), Some(at)) if at > s + 3 => format!("{}***{}", &u[..s + 3], &u[at..]),
            (None, Some(at)) => format!("***{}", &u[at..]),
            _ => u.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn serialize_redacted_url<S: serde::Serializer>(url: &str, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(&redact_url(url))
}

/// Lower-case hex SHA-256 of an API key, the form `gateway.api_keys[].sha256` stores.
pub fn hash_api_key(key: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Settings::default().validate().unwrap();
    }

    #[test]
    fn config_default_toml_lists_exactly_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.default.toml");
        let file: Settings = Figment::from(Toml::file_exact(&path)).extract().unwrap();
        assert_eq!(
            toml::to_string(&file).unwrap(),
            toml::to_string(&Settings::default()).unwrap()
        );
    }

    fn github_source() -> WebhookSource {
        WebhookSource {
            scheme: WebhookScheme::Github,
            secrets: vec![WebhookSecret {
                id: "s1".into(),
                secret: Some(SecretString::from("x".to_owned())),
                env: None,
                expires_at: None,
            }],
            body_limit_bytes: 1 << 20,
            tolerance_secs: 300,
            rules: vec![],
        }
    }

    #[test]
    fn webhook_sources_are_checked_at_start_up() {
        let check = |f: &dyn Fn(&mut WebhookSource)| {
            let mut s = Settings::default();
            let mut src = github_source();
            f(&mut src);
            s.webhooks.sources.insert("gh".into(), src);
            s.validate().err().map(|e| e.0)
        };
        assert_eq!(check(&|_| {}), None);
        assert!(check(&|s| s.secrets.clear())
            .unwrap()
            .contains("at least one"));
        assert!(check(&|s| s.secrets[0].env = Some("X".into()))
            .unwrap()
            .contains("exactly one"));
        assert!(check(&|s| {
            s.secrets[0].secret = None;
            s.secrets[0].env = Some("MHV_GH".into());
        })
        .unwrap()
        .contains("MHV_"));
        assert!(check(&|s| s.secrets.push(s.secrets[0].clone()))
            .unwrap()
            .contains("twice"));
        assert!(check(&|s| {
            s.scheme = WebhookScheme::Standard;
        })
        .unwrap()
        .contains("whsec_"));
        assert!(check(&|s| s.body_limit_bytes = 512)
            .unwrap()
            .contains("body_limit"));
        assert!(check(&|s| s.rules.push(WebhookRule {
            name: "r".into(),
            event: "issues".into(),
            actions: vec![],
            labels: vec![],
            branches: vec![],
            task: WebhookTaskTemplate {
                title: "{unclosed".into(),
                repository: "x".into(),
                description: None,
                priority: None,
                action: None,
                tags: vec![],
            },
        }))
        .unwrap()
        .contains("unclosed"));
        let mut s = Settings::default();
        s.webhooks
            .sources
            .insert("bad name".into(), github_source());
        assert!(s.validate().unwrap_err().0.contains("source name"));
        // An env secret that is not set is found when the gateway resolves it.
        let mut src = github_source();
        src.secrets[0].secret = None;
        src.secrets[0].env = Some("MAHAVISHNU_TEST_SURELY_UNSET".into());
        let e = crate::webhooks::ResolvedSource::resolve("gh", &src).unwrap_err();
        assert!(e.0.contains("MAHAVISHNU_TEST_SURELY_UNSET"));
    }

    #[test]
    fn cross_field_rules_are_enforced() {
        let mut s = Settings::default();
        s.nats.consumer.backoff_secs = vec![1];
        assert!(s.validate().unwrap_err().0.contains("backoff_secs"));
        let mut s = Settings::default();
        s.nats.consumer.max_deliver = 1;
        assert!(s.validate().unwrap_err().0.contains("max_deliver"));
        s.nats.consumer.max_deliver = 5;
        s.validate().unwrap();
        let mut s = Settings::default();
        s.worker.max_in_flight_batches = 10;
        assert!(s
            .validate()
            .unwrap_err()
            .0
            .contains("max_in_flight_batches"));
        let mut s = Settings::default();
        s.gateway.body_limit_bytes = 1 << 20;
        assert!(s.validate().unwrap_err().0.contains("body_limit_bytes"));
        let mut s = Settings::default();
        s.nats.consumer.ack_wait_secs = u64::MAX;
        s.nats.consumer.backoff_secs = vec![];
        let _ = s.validate(); // must not panic on overflow
        let mut s = Settings::default();
        s.database.statement_timeout_ms = 60_000;
        assert!(s.validate().unwrap_err().0.contains("statement_timeout_ms"));
        let mut s = Settings::default();
        s.gateway.api_keys = vec![ApiKeySettings {
            name: "a".into(),
            sha256: "XYZ".into(),
        }];
        assert!(s.validate().unwrap_err().0.contains("sha256"));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn file_then_env_layering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        std::fs::write(
            &path,
            "[worker]\nbatch_size = 7\n[nats]\nurl = \"nats://file:1\"\n",
        )
        .unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("MHV_NATS__URL", "nats://env:2");
            let s = Settings::load(Some(&path)).map_err(|e| e.0)?;
            assert_eq!(s.worker.batch_size, 7);
            assert_eq!(s.nats.url, "nats://env:2");
            Ok(())
        });
    }

    /// The form compose/docker-compose.yml uses: a whole webhook source from environment
    /// variables, the secret by `env`.
    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn a_webhook_source_can_be_configured_by_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MHV_WEBHOOKS__SOURCES__GITHUB__SCHEME", "github");
            jail.set_env(
                "MHV_WEBHOOKS__SOURCES__GITHUB__SECRETS",
                r#"[{id="compose",env="GITHUB_WEBHOOK_SECRET"}]"#,
            );
            jail.set_env(
                "MHV_WEBHOOKS__SOURCES__GITHUB__RULES",
                r#"[{name="issue-opened",event="issues",actions=["opened"],task={title="Issue #{issue.number}: {issue.title}",repository="{repository.name}"}}]"#,
            );
            let s = Settings::load(None).map_err(|e| e.0)?;
            let src = &s.webhooks.sources["github"];
            assert_eq!(src.scheme, WebhookScheme::Github);
            assert_eq!(src.secrets[0].env.as_deref(), Some("GITHUB_WEBHOOK_SECRET"));
            assert_eq!(
                src.rules[0].task.title,
                "Issue #{issue.number}: {issue.title}"
            );
            assert_eq!(src.body_limit_bytes, 25 * 1024 * 1024);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        std::fs::write(&path, "[worker]\nbatchsize = 7\n").unwrap();
        assert!(Settings::load(Some(&path))
            .unwrap_err()
            .0
            .contains("batchsize"));
    }

    #[test]
    fn nats_credentials_are_redacted_when_printed() {
        assert_eq!(
            redact_url("nats://u:p@a:4222, tls://tok@b:4222,nats://c:1"),
            "nats://***@a:4222, tls://***@b:4222,nats://c:1"
        );
        let mut s = Settings::default();
        s.nats.url = "nats://u:hunter2@a:4222".into();
        assert!(!toml::to_string(&s).unwrap().contains("hunter2"));
    }

    #[test]
    fn database_url_is_not_in_debug_output() {
        let mut s = Settings::default();
        s.database.url = SecretString::from("postgres://u:hunter2@db/x");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
