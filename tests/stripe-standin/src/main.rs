//! `stripe-standin`: runs the local Stripe until interrupted. Configuration from flags or
//! `STANDIN_*` variables (see `--help`); JSON log lines on stdout.

use clap::Parser;
use stripe_standin::{spawn, Config};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = Config::parse();
    let (addr, handle) = match spawn(config).await {
        Ok(started) => started,
        Err(e) => {
            tracing::error!(error = %e, "stripe stand-in failed to start");
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing::info!(%addr, "ready");
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::process::ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        () = handle.wait() => {
            tracing::error!("server stopped");
            return std::process::ExitCode::FAILURE;
        }
    }
    tracing::info!("stripe stand-in stopping");
    std::process::ExitCode::SUCCESS
}
