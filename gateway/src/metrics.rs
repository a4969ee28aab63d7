//! Gateway metrics. Each is bumped where its event happens, beside the log line.

use prometheus::{
    register_histogram_vec_with_registry, register_int_counter_vec_with_registry,
    register_int_gauge_with_registry, HistogramVec, IntCounterVec, IntGauge, Registry,
};
use std::collections::HashSet;
use std::sync::Mutex;

/// Most distinct `repository` label values before new ones are folded into `_other`: the
/// repository comes from client input and must not blow up the time-series count.
pub const MAX_REPOSITORY_LABELS: usize = 200;

/// The gateway's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// `task_creation_total{repository,status}`: status is accepted, duplicate, rejected or unavailable.
    pub task_creation_total: IntCounterVec,
    /// `task_creation_duration_seconds{repository}`: request to JetStream ack.
    pub task_creation_duration_seconds: HistogramVec,
    /// `mhv_gateway_http_requests_total{route,status}`.
    pub http_requests_total: IntCounterVec,
    /// `mhv_gateway_publish_failures_total{reason}`.
    pub publish_failures_total: IntCounterVec,
    /// `mhv_gateway_nats_connected` (1 or 0).
    pub nats_connected: IntGauge,
    /// `mhv_webhook_deliveries_total{source,outcome}`: accepted, duplicate, tampered,
    /// bad_signature, bad_timestamp, bad_header, too_large, unavailable, overloaded.
    pub webhook_deliveries_total: IntCounterVec,
    /// `mhv_webhook_verified_total{source,secret_id}`: which secret verified each delivery.
    pub webhook_verified_total: IntCounterVec,
    /// `mhv_webhook_claim_checked_total{source}`: bodies stored in the object store.
    pub webhook_claim_checked_total: IntCounterVec,
    repos: Mutex<HashSet<String>>,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        Ok(Self {
            task_creation_total: register_int_counter_vec_with_registry!(
                "task_creation_total",
                "Task creation requests by outcome",
                &["repository", "status"],
                registry
            )?,
            task_creation_duration_seconds: register_histogram_vec_with_registry!(
                "task_creation_duration_seconds",
                "Time from request to JetStream acknowledgement",
                &["repository"],
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
                ],
                registry
            )?,
            http_requests_total: register_int_counter_vec_with_registry!(
                "mhv_gateway_http_requests_total",
                "HTTP requests by route and status",
                &["route", "status"],
                registry
            )?,
            publish_failures_total: register_int_counter_vec_with_registry!(
                "mhv_gateway_publish_failures_total",
                "Publishes JetStream did not acknowledge",
                &["reason"],
                registry
            )?,
            nats_connected: register_int_gauge_with_registry!(
                "mhv_gateway_nats_connected",
                "1 while the gateway's NATS connection is up",
                registry
            )?,
            webhook_deliveries_total: register_int_counter_vec_with_registry!(
                "mhv_webhook_deliveries_total",
                "Webhook deliveries received, by source and outcome",
                &["source", "outcome"],
                registry
            )?,
            webhook_verified_total: register_int_counter_vec_with_registry!(
                "mhv_webhook_verified_total",
                "Webhook deliveries verified, by source and the id of the secret that matched",
                &["source", "secret_id"],
                registry
            )?,
            webhook_claim_checked_total: register_int_counter_vec_with_registry!(
                "mhv_webhook_claim_checked_total",
                "Webhook bodies too large for one message, stored in the object store",
                &["source"],
                registry
            )?,
            registry,
            repos: Mutex::new(HashSet::new()),
        })
    }

    /// The label value for a repository: itself while fewer than [`MAX_REPOSITORY_LABELS`] are
    /// known, `_other` after.
    pub fn repository_label<'a>(&self, repository: &'a str) -> &'a str {
        let Ok(mut known) = self.repos.lock() else {
            return "_other";
        };
        if known.contains(repository) {
            return repository;
        }
        if known.len() < MAX_REPOSITORY_LABELS {
            known.insert(repository.to_owned());
            return repository;
        }
        "_other"
    }

    /// Text exposition.
    pub fn render(&self) -> String {
        mahavishnu::telemetry::render_metrics(&self.registry)
    }
}
