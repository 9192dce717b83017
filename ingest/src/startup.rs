//! Wiring: the usage.raw writer, the meter store, the ClickHouse client of the usage query,
//! readiness checks, and the HTTP server.

use std::sync::Arc;

use meterline_catalog::meters::MeterStore;
use meterline_common::kafka::KafkaProbe;
use meterline_common::service::ServiceContext;
use meterline_common::{clickhouse, postgres};

use crate::kafka::UsageWriter;
use crate::routes::{self, AppState};
use crate::{metrics, Config, Error};

pub const SERVICE: &str = "ingest";

/// Runs the service until SIGTERM or SIGINT, then flushes what Kafka has not acknowledged.
pub async fn run(config: Config) -> Result<(), Error> {
    let context = ServiceContext::start(SERVICE)?;
    metrics::describe();
    let kafka = Arc::new(KafkaProbe::new(&config.kafka, SERVICE)?);
    let pool = postgres::pool(&config.postgres, 10)?;
    let writer = Arc::new(UsageWriter::new(&config.kafka, config.produce_timeout)?);
    let state = AppState {
        jwt: config.jwt.clone(),
        writer: writer.clone(),
        meters: MeterStore::new(pool.clone()),
        limits: config.limits,
        pool: pool.clone(),
        clickhouse: clickhouse::client(&config.clickhouse),
    };
    let readiness = context.readiness().kafka(kafka).postgres(pool);
    context
        .serve(config.http_addr, routes::router(state), readiness)
        .await?;
    // Requests in flight finished above; nothing they were told is stored is left queued.
    tokio::task::spawn_blocking(move || writer.flush())
        .await
        .map_err(|e| Error::Shutdown(e.to_string()))?;
    Ok(())
}
