//! Shared handler state. The gateway keeps no state of its own beyond connections and caches
//! that can be rebuilt: every request's effect lives in JetStream, every read comes from workers.

use crate::auth::ApiKeys;
use crate::metrics::Metrics;
use async_nats::jetstream;
use mahavishnu::config::Settings;
use mahavishnu::task::Limits;
use mahavishnu::webhooks::ResolvedSource;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::Semaphore;

/// The webhook stores, once JetStream has them (see `watch_topology`).
#[derive(Clone)]
pub struct WebhookStores {
    /// The ledger's KV front.
    pub ledger: jetstream::kv::Store,
    /// Claim-checked bodies.
    pub bodies: jetstream::object_store::ObjectStore,
}

impl std::fmt::Debug for WebhookStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookStores")
    }
}

/// Cloned into every handler.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: Settings,
    keys: ApiKeys,
    nats: async_nats::Client,
    js: jetstream::Context,
    metrics: Metrics,
    limits: Limits,
    stream_ready: AtomicBool,
    webhook_sources: HashMap<String, ResolvedSource>,
    webhook_stores: RwLock<Option<WebhookStores>>,
    /// Budget of webhook body bytes in memory, in KiB permits.
    webhook_buffer: Arc<Semaphore>,
}

impl AppState {
    /// Builds the state. `nats` may still be connecting. Fails when a webhook secret cannot be
    /// resolved (an `env` secret whose variable is unset).
    pub fn new(settings: Settings, nats: async_nats::Client) -> anyhow::Result<Self> {
        let mut webhook_sources = HashMap::new();
        for (name, src) in &settings.webhooks.sources {
            webhook_sources.insert(name.clone(), ResolvedSource::resolve(name, src)?);
        }
        let budget_kib =
            (settings.gateway.webhook_max_buffered_bytes / 1024).min(Semaphore::MAX_PERMITS);
        let js = jetstream::ContextBuilder::new()
            .timeout(mahavishnu::config::ms(settings.nats.request_timeout_ms))
            .ack_timeout(mahavishnu::config::ms(settings.nats.publish_ack_timeout_ms))
            .build(nats.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                keys: ApiKeys::new(&settings.gateway.api_keys),
                metrics: Metrics::new()?,
                limits: Limits::default(),
                stream_ready: AtomicBool::new(false),
                webhook_sources,
                webhook_stores: RwLock::new(None),
                webhook_buffer: Arc::new(Semaphore::new(budget_kib)),
                settings,
                nats,
                js,
            }),
        })
    }

    /// Settings.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }
    /// API keys.
    pub fn keys(&self) -> &ApiKeys {
        &self.inner.keys
    }
    /// Core NATS client (request-reply reads).
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.nats
    }
    /// JetStream context (publishes).
    pub fn js(&self) -> &jetstream::Context {
        &self.inner.js
    }
    /// Metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }
    /// Task field limits.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }
    /// True while NATS is connected.
    pub fn nats_connected(&self) -> bool {
        matches!(
            self.inner.nats.connection_state(),
            async_nats::connection::State::Connected
        )
    }
    /// True when the last topology check found the stream and consumer in place.
    pub fn stream_ready(&self) -> bool {
        self.inner.stream_ready.load(Ordering::Relaxed)
    }
    /// A configured webhook source.
    pub fn webhook_source(&self, name: &str) -> Option<&ResolvedSource> {
        self.inner.webhook_sources.get(name)
    }
    /// True when any webhook source is configured.
    pub fn has_webhook_sources(&self) -> bool {
        !self.inner.webhook_sources.is_empty()
    }
    /// The webhook stores, if set up.
    pub fn webhook_stores(&self) -> Option<WebhookStores> {
        self.inner
            .webhook_stores
            .read()
            .ok()
            .and_then(|g| g.clone())
    }
    /// Records the webhook stores (or forgets them when JetStream lost them).
    pub fn set_webhook_stores(&self, stores: Option<WebhookStores>) {
        if let Ok(mut g) = self.inner.webhook_stores.write() {
            *g = stores;
        }
    }
    /// The webhook body budget (KiB permits).
    pub fn webhook_buffer(&self) -> &Arc<Semaphore> {
        &self.inner.webhook_buffer
    }
    /// Records the outcome of a topology check.
    pub fn set_stream_ready(&self, ready: bool) {
        self.inner.stream_ready.store(ready, Ordering::Relaxed);
    }
}
