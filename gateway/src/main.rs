//! `mhv-gateway`: load settings, start telemetry, serve until SIGTERM or Ctrl-C.

use clap::Parser;
use std::path::PathBuf;

/// Mahavishnu HTTP gateway.
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
    // Webhook secrets given by `env` are read now: a missing one is a configuration error.
    for (name, src) in &settings.webhooks.sources {
        if let Err(e) = mahavishnu::webhooks::ResolvedSource::resolve(name, src) {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    }
    let listener = match tokio::net::TcpListener::bind(&settings.gateway.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, listen = %settings.gateway.listen, "cannot bind");
            return std::process::ExitCode::from(1);
        }
    };
    match mahavishnu_gateway::run(settings, listener, mahavishnu::cli::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "gateway failed");
            std::process::ExitCode::from(1)
        }
    }
}
