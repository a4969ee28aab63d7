//! Worker metrics. Each is bumped where its event happens.

use prometheus::{
    register_histogram_with_registry, register_int_counter_vec_with_registry,
    register_int_gauge_with_registry, Histogram, IntCounterVec, IntGauge, Registry,
};

/// The worker's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    /// Registry rendered at `/metrics`.
    pub registry: Registry,
    /// `mhv_worker_messages_total{outcome}`: persisted, duplicate, dead_lettered, retried.
    pub messages_total: IntCounterVec,
    /// `mhv_worker_batch_size`: messages per transaction.
    pub batch_size: Histogram,
    /// `mhv_worker_transaction_duration_seconds`.
    pub transaction_seconds: Histogram,
    /// `mhv_worker_in_flight_batches`.
    pub in_flight_batches: IntGauge,
    /// `mhv_worker_reads_total{endpoint,outcome}`.
    pub reads_total: IntCounterVec,
    /// `mhv_worker_up` (1 while consuming).
    pub up: IntGauge,
    /// `mhv_webhook_deliveries_processed_total{source,verdict}`: task_created, no_match, invalid,
    /// duplicate, replayed, tampered, redelivered.
    pub webhook_deliveries_total: IntCounterVec,
    /// `mhv_exec_requests_total{outcome}`: execution requests settled (acked, nacked, terminated).
    pub exec_requests_total: IntCounterVec,
    /// `mhv_exec_attempts_total{state}`: attempts finished, by how (succeeded, failed, timed_out,
    /// gate_failed, cancelled, interrupted).
    pub exec_attempts_total: IntCounterVec,
    /// `mhv_exec_running`: tasks this worker runs now.
    pub exec_running: IntGauge,
    /// `mhv_exec_takeovers_total`: attempts of dead workers taken over.
    pub exec_takeovers_total: prometheus::IntCounter,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        Ok(Self {
            messages_total: register_int_counter_vec_with_registry!(
                "mhv_worker_messages_total",
                "Task messages handled, by outcome",
                &["outcome"],
                registry
            )?,
            batch_size: register_histogram_with_registry!(
                "mhv_worker_batch_size",
                "Messages written per transaction",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1000.0],
                registry
            )?,
            transaction_seconds: register_histogram_with_registry!(
                "mhv_worker_transaction_duration_seconds",
                "Duration of a batch transaction",
                vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
                registry
            )?,
            in_flight_batches: register_int_gauge_with_registry!(
                "mhv_worker_in_flight_batches",
                "Batches being written now",
                registry
            )?,
            reads_total: register_int_counter_vec_with_registry!(
                "mhv_worker_reads_total",
                "Read requests answered, by endpoint and outcome",
                &["endpoint", "outcome"],
                registry
            )?,
            up: register_int_gauge_with_registry!(
                "mhv_worker_up",
                "1 while the worker is consuming",
                registry
            )?,
            webhook_deliveries_total: register_int_counter_vec_with_registry!(
                "mhv_webhook_deliveries_processed_total",
                "Webhook deliveries the workers committed, by source and verdict",
                &["source", "verdict"],
                registry
            )?,
            exec_requests_total: register_int_counter_vec_with_registry!(
                "mhv_exec_requests_total",
                "Execution requests settled, by outcome",
                &["outcome"],
                registry
            )?,
            exec_attempts_total: register_int_counter_vec_with_registry!(
                "mhv_exec_attempts_total",
                "Execution attempts finished, by final state",
                &["state"],
                registry
            )?,
            exec_running: register_int_gauge_with_registry!(
                "mhv_exec_running",
                "Tasks this worker is running now",
                registry
            )?,
            exec_takeovers_total: prometheus::register_int_counter_with_registry!(
                "mhv_exec_takeovers_total",
                "In-flight attempts of dead workers taken over",
                registry
            )?,
            registry,
        })
    }

    /// Text exposition.
    pub fn render(&self) -> String {
        mahavishnu::telemetry::render_metrics(&self.registry)
    }
}
