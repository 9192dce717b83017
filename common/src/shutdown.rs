//! Graceful shutdown: one token, cancelled by SIGTERM or SIGINT, that every task of a
//! service watches. Tasks finish their in-flight work, commit what they finished, and return.

use tokio_util::sync::CancellationToken;

/// Cancels the returned token on the first SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received, finishing in-flight work");
        cancel.cancel();
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers the process could never stop gracefully; fall back to
        // Ctrl-C alone and say so.
        _ => {
            tracing::warn!("cannot install SIGTERM handler, listening for ctrl-c only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
