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

/// Waits `period`, or less if shutdown begins: true when the full period passed, false when
/// the task should stop. The pause of every periodic loop and retry wait, so none of them
/// holds up a shutdown.
pub async fn pause(period: std::time::Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(period) => true,
        _ = shutdown.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_pause_ends_early_when_shutdown_begins() {
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        assert!(pause(Duration::from_secs(5), &shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        shutdown.cancel();
        assert!(!pause(Duration::from_secs(5), &shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
