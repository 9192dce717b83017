//! Wiring: the consumers, ClickHouse, the window registry, the loops, readiness checks and
//! the operations server. Shutdown (SIGTERM) lets each loop finish the batch in hand and
//! commit it before the process exits.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use meterline_common::kafka::{DeadLetters, KafkaProbe, Topics};
use meterline_common::service::ServiceContext;
use meterline_common::{clickhouse, postgres};
use meterline_schemas::Topic;
use tokio::sync::Notify;

use crate::clickhouse::Warehouse;
use crate::kafka::Writer;
use crate::pipeline::{self, Shared};
use crate::windows::WindowRegistry;
use crate::{metrics, Config, Error};

pub const SERVICE: &str = "aggregator";

/// Runs the service until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), Error> {
    let context = ServiceContext::start(SERVICE)?;
    metrics::describe();
    let probe = Arc::new(KafkaProbe::new(&config.kafka, SERVICE)?);
    let warehouse_client = clickhouse::client(&config.clickhouse);
    let pool = postgres::pool(&config.postgres, 10)?;
    let topics = Topics::new(config.kafka.topic_prefix.clone());

    let shared = Arc::new(Shared {
        warehouse: Warehouse::new(warehouse_client.clone()),
        registry: WindowRegistry::new(pool.clone()),
        writer: Writer::new(&config.kafka)?,
        dead_letters: DeadLetters::new(&config.kafka, SERVICE)?,
        pool: pool.clone(),
        grace: config.grace,
        // Two batches' worth of waiting: events of one backlog batch are all in.
        quiet: config.batch.max_wait * 2,
        batch_done: Notify::new(),
    });
    // Said once, when ClickHouse answers at start: an install that predates ClickHouse
    // migration 5 until it is converted (every window total reads the customer's history).
    let layout_settings = config.clickhouse.clone();
    tokio::spawn(async move {
        if let Ok(clickhouse::EventsLayout::ById { rows }) =
            clickhouse::events_layout(&layout_settings).await
        {
            tracing::warn!(
                rows,
                "events_processed is still ordered by event id: every window total reads the \
                 customer's whole history; stop the aggregator and run `meterline migrate \
                 --relayout-events` to order it by time"
            );
        }
    });
    let usage = Arc::new(meterline_common::kafka::subscribe(
        &config.kafka,
        SERVICE,
        &config.group_id,
        &topics.name(Topic::UsageRaw),
    )?);
    let resync = Arc::new(meterline_common::kafka::subscribe(
        &config.kafka,
        SERVICE,
        &format!("{}-resync", config.group_id),
        &topics.name(Topic::UsageResync),
    )?);

    let shutdown = context.shutdown.clone();
    let pruning = meterline_common::retention::run_pruning(
        &crate::windows::WINDOWS,
        pool.clone(),
        config.windows_retention,
        config.prune_interval,
        shutdown.clone(),
    );
    let loops = vec![
        tokio::spawn(async move { pruning.await.map_err(Error::from) }),
        tokio::spawn(pipeline::consume_usage(
            shared.clone(),
            usage.clone(),
            config.batch,
            shutdown.clone(),
        )),
        tokio::spawn(pipeline::publish_due(
            shared.clone(),
            config.publish_interval,
            shutdown.clone(),
        )),
        tokio::spawn(pipeline::consume_resync(
            shared.clone(),
            resync,
            shutdown.clone(),
        )),
        tokio::spawn(pipeline::run_backfills(shared.clone(), shutdown.clone())),
        tokio::spawn(pipeline::follow_billing_periods(
            shared.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(crate::kafka::report_lag(
            usage,
            Duration::from_secs(10),
            shutdown.clone(),
        )),
    ];

    let readiness = context
        .readiness()
        .kafka(probe)
        .clickhouse(warehouse_client)
        .postgres(pool);
    let served = context
        .serve(config.http_addr, Router::new(), readiness)
        .await;
    // A loop that failed for good stops the process: cancel the others, then report.
    context.finish(served, loops).await
}
