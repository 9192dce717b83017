//! Wiring: clients for Kafka, ClickHouse and PostgreSQL, readiness checks, and the HTTP server.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use meterline_common::kafka::KafkaProbe;
use meterline_common::service::ServiceContext;
use meterline_common::{clickhouse, postgres};

use crate::{Config, Error};

pub const SERVICE: &str = "aggregator";

/// Runs the service until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), Error> {
    let context = ServiceContext::start(SERVICE)?;
    let kafka = Arc::new(KafkaProbe::new(&config.kafka, SERVICE)?);
    let warehouse = clickhouse::client(&config.clickhouse);
    let pool = postgres::pool(&config.postgres, 10)?;
    let readiness = context
        .readiness()
        .check("kafka", move || {
            let kafka = kafka.clone();
            async move { kafka.check(Duration::from_secs(2)).await }
        })
        .check("clickhouse", move || {
            let warehouse = warehouse.clone();
            async move { clickhouse::check(&warehouse).await }
        })
        .check("postgres", move || {
            let pool = pool.clone();
            async move { postgres::check(&pool).await }
        });
    context
        .serve(config.http_addr, Router::new(), readiness)
        .await?;
    Ok(())
}
