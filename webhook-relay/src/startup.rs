//! Wiring: the stripe.webhooks publisher, the secret and deduplication stores, readiness
//! checks, the HTTP server, and the pruning of its deduplication records.

use std::sync::Arc;

use meterline_accounts::stripe_config::StripeConfigStore;
use meterline_common::kafka::KafkaProbe;
use meterline_common::service::ServiceContext;
use meterline_common::{postgres, retention};

use crate::deliveries::{self, DeliveryLog};
use crate::kafka::WebhookPublisher;
use crate::relay::Relay;
use crate::routes::{self, AppState};
use crate::secrets::EndpointSecrets;
use crate::{metrics, Config, Error};

pub const SERVICE: &str = "webhook-relay";

/// Runs the service until SIGTERM or SIGINT, then flushes what Kafka has not acknowledged.
pub async fn run(config: Config) -> Result<(), Error> {
    let context = ServiceContext::start(SERVICE)?;
    metrics::describe();
    let kafka = Arc::new(KafkaProbe::new(&config.kafka, SERVICE)?);
    let pool = postgres::pool(&config.postgres, 10)?;
    let publisher = Arc::new(WebhookPublisher::new(
        &config.kafka,
        config.produce_timeout,
    )?);
    let state = AppState {
        secrets: EndpointSecrets::new(
            StripeConfigStore::new(pool.clone(), config.keys.clone()),
            config.fallback_secret.clone(),
        ),
        tolerance_seconds: config.tolerance.as_secs(),
        relay: Arc::new(Relay::new(
            DeliveryLog::new(pool.clone()),
            publisher.clone(),
        )),
    };
    let pruning = tokio::spawn({
        let (pool, shutdown) = (pool.clone(), context.shutdown.clone());
        async move {
            retention::run_pruning(
                &deliveries::DELIVERIES,
                pool,
                config.retention,
                config.prune_interval,
                shutdown,
            )
            .await
            .map_err(Error::from)
        }
    });
    let readiness = context.readiness().kafka(kafka).postgres(pool);
    let served = context
        .serve(
            config.http_addr,
            routes::router(state, config.max_body_bytes, config.sources.clone()),
            readiness,
        )
        .await;
    context.finish(served, vec![pruning]).await?;
    // Deliveries in flight finished above; nothing they were answered for is left queued.
    tokio::task::spawn_blocking(move || publisher.flush())
        .await
        .map_err(|e| Error::Shutdown(e.to_string()))?;
    Ok(())
}
