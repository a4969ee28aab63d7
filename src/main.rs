//! `mhv`: the operator CLI. Parsing and dispatch only; the work is in `mahavishnu::cli`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = mahavishnu::cli::Cli::parse();
    let log = mahavishnu::config::LogSettings {
        format: mahavishnu::config::LogFormat::Pretty,
        filter: "warn,mahavishnu=info".into(),
    };
    mahavishnu::telemetry::init(&log, std::io::stderr);
    match mahavishnu::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
