//! `mhv-worker`: load settings, start telemetry, consume until SIGTERM or Ctrl-C.

use clap::Parser;
use std::path::PathBuf;

/// Mahavishnu worker.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); `MHV_*` environment variables override it.
    #[arg(long, env = "MHV_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let settings = match mahavishnu::cli::service_settings(args.config.as_deref()) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        mahavishnu::cli::shutdown_signal().await;
        signal.cancel();
    });
    match mahavishnu_workers::run(settings, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "worker failed");
            std::process::ExitCode::from(1)
        }
    }
}
