//! # Mahavishnu gateway
//!
//! Thin on purpose: authenticate, validate, publish to JetStream with a `Nats-Msg-Id`, and answer
//! `202` only once JetStream acknowledged. Reads go to the workers over NATS request-reply, so
//! this process, the one facing the internet, holds no database credentials.
//!
//! It must not: keep state that a restart would lose, touch PostgreSQL, or answer 2xx for work
//! that is not durably queued.

pub mod auth;
pub mod error;
pub mod metrics;
pub mod routes;
pub mod server;
pub mod state;

use mahavishnu::config::Settings;
use mahavishnu::topology;
use state::AppState;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;

/// Runs the gateway on `listener` until `shutdown` resolves.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let nats = topology::connect(&settings.nats.url, "mhv-gateway").await?;
    let state = AppState::new(settings, nats)?;
    let watcher = tokio::spawn(watch_topology(state.clone()));
    let g = &state.settings().gateway;
    let (header_timeout, drain) = (
        Duration::from_millis(g.header_read_timeout_ms),
        Duration::from_millis(g.request_timeout_ms),
    );
    tracing::info!(listen = %listener.local_addr()?, "gateway listening");
    server::serve(
        listener,
        server::app(state.clone()),
        header_timeout,
        drain,
        shutdown,
    )
    .await;
    watcher.abort();
    // Let buffered acks and publishes leave before the connection closes.
    let _ = state.nats().flush().await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// Keeps readiness current: creates or updates the stream when NATS is reachable and it is
/// missing (first start, or a server that lost its store). The consumer is the workers'.
async fn watch_topology(state: AppState) {
    let mut ensured = false;
    loop {
        let connected = state.nats_connected();
        state.metrics().nats_connected.set(i64::from(connected));
        let ready = if !connected {
            false
        } else if !ensured {
            let ensure = async {
                topology::ensure_stream(state.js(), &state.settings().nats).await?;
                if state.has_webhook_sources() {
                    let (ledger, bodies) =
                        topology::webhook_stores(state.js(), state.settings()).await?;
                    state.set_webhook_stores(Some(state::WebhookStores { ledger, bodies }));
                }
                anyhow::Ok(())
            };
            match ensure.await {
                Ok(()) => {
                    ensured = true;
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot set up JetStream yet");
                    false
                }
            }
        } else {
            let mut streams = vec![state.settings().nats.stream.name.clone()];
            if state.has_webhook_sources() {
                streams.extend(topology::webhook_store_streams(state.settings()));
            }
            let mut ok = true;
            for name in &streams {
                if let Err(e) = state.js().get_stream(name).await {
                    tracing::warn!(error = %e, stream = %name, "stream not found; will recreate");
                    ok = false;
                    break;
                }
            }
            ensured = ok;
            ok
        };
        if ready != state.stream_ready() {
            tracing::info!(ready, "gateway readiness changed");
        }
        state.set_stream_ready(ready);
        tokio::time::sleep(Duration::from_millis(if ready { 2_000 } else { 250 })).await;
    }
}
