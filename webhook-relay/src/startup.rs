//! Wiring: clients for Kafka and PostgreSQL, readiness checks, and the HTTP server.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use meterline_common::kafka::KafkaProbe;
use meterline_common::postgres;
use meterline_common::service::ServiceContext;

use crate::{Config, Error};

pub const SERVICE: &str = "webhook-relay";

/// Runs the service until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), Error> {
    let context = ServiceContext::start(SERVICE)?;
    let kafka = Arc::new(KafkaProbe::new(&config.kafka, SERVICE)?);
    let pool = postgres::pool(&config.postgres, 10)?;
    let readiness = context
        .readiness()
        .check("kafka", move || {
            let kafka = kafka.clone();
            async move { kafka.check(Duration::from_secs(2)).await }
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
