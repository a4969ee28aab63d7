//! Shared handler state. The gateway keeps no state of its own beyond connections and caches
//! that can be rebuilt: every request's effect lives in JetStream, every read comes from workers.

use crate::auth::ApiKeys;
use crate::metrics::Metrics;
use async_nats::jetstream;
use mahavishnu::config::Settings;
use mahavishnu::task::Limits;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
}

impl AppState {
    /// Builds the state. `nats` may still be connecting.
    pub fn new(settings: Settings, nats: async_nats::Client) -> anyhow::Result<Self> {
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
    /// Records the outcome of a topology check.
    pub fn set_stream_ready(&self, ready: bool) {
        self.inner.stream_ready.store(ready, Ordering::Relaxed);
    }
}
