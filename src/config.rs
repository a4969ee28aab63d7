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
        if c.max_deliver != -1 {
            // JetStream neither removes nor redelivers a message past MaxDeliver, and its
            // advisory is fire-and-forget: an accepted task would be stranded. Allowed again once
            // advisories are captured into the dead-letter store.
            return err(format!(
                "nats.consumer.max_deliver is {}; only -1 is supported: a finite limit strands accepted tasks after an outage (workers dead-letter poison themselves)",
                c.max_deliver
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
    fn cross_field_rules_are_enforced() {
        let mut s = Settings::default();
        s.nats.consumer.backoff_secs = vec![1];
        assert!(s.validate().unwrap_err().0.contains("backoff_secs"));
        let mut s = Settings::default();
        s.nats.consumer.max_deliver = 5;
        assert!(s.validate().unwrap_err().0.contains("max_deliver"));
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
