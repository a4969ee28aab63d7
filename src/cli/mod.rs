//! The `mhv` operator CLI. `main.rs` only parses and dispatches to these functions.

pub mod bench;
pub mod dlq;
pub mod tasks;
pub mod up;
pub mod webhooks;

use crate::config::Settings;
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Mahavishnu operator CLI.
#[derive(Parser, Debug)]
#[command(name = "mhv", version, about, propagate_version = true)]
pub struct Cli {
    /// Configuration file (TOML); `MHV_*` environment variables override it.
    #[arg(long, global = true, env = "MHV_CONFIG")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the database if needed and apply pending migrations.
    Migrate,
    /// Bring up a local stack: NATS and PostgreSQL (started if nothing answers), migrations,
    /// the gateway and two workers. Ctrl-C stops everything it started.
    Up(up::UpArgs),
    /// Print the version.
    Version,
    /// Exit 0 when the URL answers 2xx within the timeout (for container health checks).
    Healthcheck {
        /// URL to check, e.g. http://127.0.0.1:8080/readyz or a worker's /healthz.
        #[arg(long, default_value = "http://127.0.0.1:8080/readyz")]
        url: String,
        /// Seconds to wait for an answer.
        #[arg(long, default_value_t = 3)]
        timeout_secs: u64,
    },
    /// Measure JetStream, the gateway and the workers on this machine (see docs/benchmarks.md).
    Bench(bench::BenchArgs),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// API key tools.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Webhook sources, deliveries and forced redelivery.
    #[command(subcommand)]
    Webhooks(webhooks::WebhooksCommand),
    /// Cancel, retry and inspect tasks.
    #[command(subcommand)]
    Tasks(tasks::TasksCommand),
    /// Dead letters: list, show, replay.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
}

/// `mhv config …`.
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Load and validate the configuration, then print it (secrets redacted).
    Check,
}

/// `mhv keys …`.
#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Print the SHA-256 to put in `gateway.api_keys[].sha256` for a key read from stdin.
    Hash,
    /// Generate a new random key and print it with its configuration entry.
    Generate {
        /// Principal name for the key.
        #[arg(long)]
        name: String,
    },
}

/// Runs a parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let load = || Settings::load(cli.config.as_deref()).map_err(anyhow::Error::from);
    match cli.command {
        Command::Version => {
            println!("mhv {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Migrate => {
            let s = load()?;
            crate::db::migrate(&s.database).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Config(ConfigCommand::Check) => {
            let s = load()?;
            println!(
                "{}",
                toml::to_string_pretty(&s).context("rendering settings")?
            );
            eprintln!("configuration is valid");
            Ok(())
        }
        Command::Keys(KeysCommand::Hash) => {
            let mut key = String::new();
            std::io::stdin().read_line(&mut key)?;
            println!(
                "{}",
                crate::config::hash_api_key(key.trim_end_matches(['\r', '\n']))
            );
            Ok(())
        }
        Command::Keys(KeysCommand::Generate { name }) => {
            if !crate::task::validate::is_valid_repository(&name, 64) {
                anyhow::bail!("MHV-003: --name must match ^[A-Za-z0-9_-]{{1,64}}$");
            }
            let key = generate_key();
            println!("key:    {key}");
            println!(
                "config: [[gateway.api_keys]]\n        name = \"{name}\"\n        sha256 = \"{}\"",
                crate::config::hash_api_key(&key)
            );
            Ok(())
        }
        Command::Healthcheck { url, timeout_secs } => {
            let resp = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(timeout_secs))
                .build()?
                .get(&url)
                .send()
                .await
                .with_context(|| format!("{url} did not answer"))?;
            let status = resp.status();
            if !status.is_success() {
                anyhow::bail!(
                    "{url} answered {status}: {}",
                    resp.text().await.unwrap_or_default()
                );
            }
            println!("{url}: {status}");
            Ok(())
        }
        Command::Bench(args) => bench::run(load()?, args).await,
        Command::Up(args) => up::run(load()?, args).await,
        Command::Webhooks(cmd) => webhooks::run(load()?, cmd).await,
        Command::Tasks(cmd) => tasks::run(load()?, cmd).await,
        Command::Dlq(cmd) => dlq::run(load()?, cmd).await,
    }
}

/// A random API key: `mhv_` and 64 hex characters (256 bits from the OS RNG via UUIDv4).
pub fn generate_key() -> String {
    format!(
        "mhv_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Start of every service binary: load and validate settings, then start telemetry. On a
/// configuration error it prints the `MHV-001` message and returns exit code 2.
pub fn service_settings(
    config: Option<&std::path::Path>,
) -> Result<Settings, std::process::ExitCode> {
    match Settings::load(config) {
        Ok(s) => {
            crate::telemetry::init(&s.log, std::io::stderr);
            Ok(s)
        }
        Err(e) => {
            eprintln!("{e}");
            Err(std::process::ExitCode::from(2))
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn generated_keys_are_distinct_and_long() {
        let (a, b) = (generate_key(), generate_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 64);
    }
}
