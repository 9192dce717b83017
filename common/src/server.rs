//! Serving an axum router until shutdown.

use std::net::SocketAddr;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Error;

/// Binds `addr`. Separate from [`serve`] so that a caller learns the bound port (tests bind
/// port 0) and a bind failure surfaces before anything else starts.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Io {
        context: format!("binding {addr}"),
        source,
    })
}

/// Serves `router` until `shutdown` is cancelled, then lets in-flight requests finish.
/// Each request carries its peer's address (`ConnectInfo<SocketAddr>`), for source checks.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let addr = listener.local_addr().map_err(|source| Error::Io {
        context: "reading bound address".into(),
        source,
    })?;
    tracing::info!(%addr, "listening");
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
    .map_err(|source| Error::Io {
        context: "serving http".into(),
        source,
    })
}
