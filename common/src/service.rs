//! What every service binary does around its own work: exit code 2 on bad configuration,
//! JSON logs, the metrics recorder, the shutdown signal, and the HTTP server that carries both
//! the service's routes and the operations routes.

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::ops::{self, Readiness};
use crate::{metrics, server, shutdown, telemetry, Error};

/// Runs a service binary: parses its configuration (printing one line naming the bad variable
/// and exiting with code 2 when that fails), sets up logging, then runs `run` on a Tokio
/// runtime. Exit code 1 when `run` fails.
pub fn main<C, F, Fut, E>(
    service: &'static str,
    load: impl FnOnce() -> Result<C, ConfigError>,
    run: F,
) -> ExitCode
where
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let config = match load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{service}: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{service}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => {
            tracing::info!(service, "stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(service, error = %e, "stopped on error");
            ExitCode::FAILURE
        }
    }
}

/// The process-wide parts of a running service.
pub struct ServiceContext {
    pub name: &'static str,
    pub shutdown: CancellationToken,
    pub metrics: PrometheusHandle,
}

impl ServiceContext {
    /// Installs the metrics recorder and the signal handler. Call once per process.
    pub fn start(name: &'static str) -> Result<Self, Error> {
        let metrics = metrics::install(name)?;
        Ok(Self {
            name,
            shutdown: shutdown::on_signal(),
            metrics,
        })
    }

    pub fn readiness(&self) -> Readiness {
        Readiness::new(self.name, self.shutdown.clone())
    }

    /// Serves `routes` plus the operations routes on `addr` until shutdown.
    pub async fn serve(
        &self,
        addr: SocketAddr,
        routes: Router,
        readiness: Readiness,
    ) -> Result<(), Error> {
        let listener = server::bind(addr).await?;
        let router = ops::with_request_metrics(
            routes.merge(ops::router(readiness, self.metrics.clone())),
            self.name,
        );
        tracing::info!(
            service = self.name,
            version = env!("CARGO_PKG_VERSION"),
            "starting"
        );
        server::serve(listener, router, self.shutdown.clone()).await
    }

    /// After the server stopped (or failed): cancels every loop, waits for each to finish
    /// its work in hand, and returns the first failure, if any.
    pub async fn finish<E>(
        &self,
        served: Result<(), Error>,
        loops: Vec<tokio::task::JoinHandle<Result<(), E>>>,
    ) -> Result<(), E>
    where
        E: From<Error>,
    {
        self.shutdown.cancel();
        let mut failure = served.err().map(E::from);
        for handle in loops {
            match handle.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(e) => {
                    tracing::error!(error = %e, "a service task panicked");
                    failure = failure.or(Some(E::from(Error::Task(e.to_string()))));
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }
}
