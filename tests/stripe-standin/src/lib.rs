//! A local Stripe that behaves like Stripe, for meterline's tests and demo (there is no
//! internet). What it reproduces, and why each rule matters, is written in
//! `shared/stripe-facts.md`; every rule here is checked by a test in `tests/it/` (meter
//! events, resources, webhooks), and `tests/it/contract.rs` checks that Stripe's own
//! `stripe-mock` accepts and refuses the same requests we do.
//!
//! Layout:
//! - [`config`]: listen address, initial accounts, default rate limit (CLI / `STANDIN_*` env).
//! - [`form`]: Stripe's bracket-notation form decoder, a pure function (fuzz target).
//! - [`rules`]: the time, value and aggregation rules as pure functions.
//! - [`signature`]: webhook signing (`Stripe-Signature`).
//! - [`state`]: all state behind one mutex, the movable clock, fault draws.
//! - `api`: the Stripe routes and the request pipeline (auth, limits, idempotency, faults).
//! - `control`: `/_standin/...` test control and inspection.
//! - `webhooks`: events and their signed, retried, asynchronous delivery.
//! - `server`: the accept loop (able to drop a connection on purpose).
//! - [`error`]: the one error type, rendered as Stripe's error object.

mod api;
pub mod config;
mod control;
pub mod error;
pub mod form;
pub mod rules;
mod server;
pub mod signature;
pub mod state;
mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use config::Config;
pub use error::Error;
pub use form::{decode_form, FormError, FormValue};

use state::{App, Standin};

/// A running stand-in. Dropping it (or calling [`StandinHandle::shutdown`]) stops the server
/// and the webhook dispatcher; deliveries already in their retry loop end on their next try.
pub struct StandinHandle {
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl StandinHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`: the base URL to give a Stripe client (`api.stripe.com` stand-in).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn shutdown(self) {
        drop(self);
    }

    /// Waits until the server stops (it only stops on error or when the task is aborted).
    pub async fn wait(mut self) {
        if let Some(server) = self.tasks.first_mut() {
            let _ = server.await;
        }
    }
}

impl Drop for StandinHandle {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The whole HTTP surface: control routes, then every other path through the API pipeline.
fn router(app: App) -> Router {
    control::router().fallback(api::handle).with_state(app)
}

/// Binds `config.addr` (port 0 picks a free port) and serves in the background.
pub async fn spawn(config: Config) -> Result<(SocketAddr, StandinHandle), Error> {
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| Error::Io {
            context: "binding the listen address",
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Io {
        context: "reading the bound address",
        source,
    })?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app: App = Arc::new(Standin::new(config, tx));
    let dispatcher = tokio::spawn(webhooks::dispatcher(Arc::downgrade(&app), rx));
    let server = tokio::spawn(server::serve(listener, router(app)));
    tracing::info!(%addr, "stripe stand-in listening");
    Ok((
        addr,
        StandinHandle {
            addr,
            tasks: vec![server, dispatcher],
        },
    ))
}
