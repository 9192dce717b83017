//! Wiring: the stores, the Stripe client, the consumers of `stripe.webhooks` and
//! `usage.windows`, the dispatchers, the ledger's pruning, readiness checks, and the control
//! API server. Shutdown
//! (SIGTERM) lets each loop finish the work in hand and record it before the process exits.

use std::sync::Arc;
use std::time::Duration;

use meterline_accounts::stripe_config::StripeConfigStore;
use meterline_common::kafka::{DeadLetters, KafkaProbe, Topics};
use meterline_common::service::ServiceContext;
use meterline_common::{postgres, retention};
use meterline_schemas::Topic;

use crate::import::{self, ImportStore, Importer};
use crate::kafka::ResyncPublisher;
use crate::ledger::{self, Ledger};
use crate::mappings::MappingStore;
use crate::pacing::shared::SharedPacing;
use crate::pacing::{Backoff, Pacer};
use crate::routes::{self, AppState};
use crate::stripe::StripeClient;
use crate::sync::{self, SyncContext};
use crate::{metrics, webhook_events, Config, Error};

pub const SERVICE: &str = "stripe-sink";

/// Dispatchers settling windows at once (each holds one customer and meter).
const DISPATCHERS: usize = 8;

/// The consumer groups of the sink (replicas share them).
const WEBHOOKS_GROUP: &str = "meterline-stripe-sink-webhooks";
const WINDOWS_GROUP: &str = "meterline-stripe-sink-windows";

/// How often the ledger and Kafka gauges are read.
const GAUGES_EVERY: Duration = Duration::from_secs(15);

/// Runs the service until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), Error> {
    let context = ServiceContext::start(SERVICE)?;
    metrics::describe();
    metrics::describe_sync();
    let kafka = Arc::new(KafkaProbe::new(&config.kafka, SERVICE)?);
    let pool = postgres::pool(&config.postgres, 20)?;
    let topics = Topics::new(config.kafka.topic_prefix.clone());
    let mappings = MappingStore::new(pool.clone());
    let configs = StripeConfigStore::new(pool.clone(), config.keys.clone());
    let ledger = Ledger::new(pool.clone());
    let stripe = StripeClient::new(&config.stripe.api_base, config.stripe.timeout)
        .map_err(|e| Error::Config(format!("building the http client: {e}")))?;
    let pacer = Arc::new(Pacer::new(SharedPacing::new(pool.clone())));
    let imports = ImportStore::new(pool.clone());
    let import_wake = Arc::new(tokio::sync::Notify::new());
    let importer = Arc::new(Importer {
        store: imports.clone(),
        configs: configs.clone(),
        stripe: stripe.clone(),
        pacer: pacer.clone(),
        backoff: Backoff {
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
        },
        // One page request at its time limit, with room for the pause before it.
        lease: config.stripe.timeout + Duration::from_secs(15),
        wake: import_wake.clone(),
    });
    let state = AppState {
        jwt: config.jwt.clone(),
        pool: pool.clone(),
        configs: configs.clone(),
        mappings: mappings.clone(),
        ledger: ledger.clone(),
        stripe: stripe.clone(),
        pacer: pacer.clone(),
        resync: Arc::new(ResyncPublisher::new(&config.kafka)?),
        imports,
        import_wake,
        window_change_lead: config.window_change_lead,
    };
    let dead_letters = DeadLetters::new(&config.kafka, SERVICE)?;
    let reports = webhook_events::Reports {
        ledger: ledger.clone(),
        configs: configs.clone(),
        stripe: stripe.clone(),
    };
    let sync = Arc::new(SyncContext {
        ledger,
        meters: meterline_catalog::meters::MeterStore::new(pool.clone()),
        configs,
        mappings: mappings.clone(),
        stripe,
        pacer,
        settings: config.stripe.clone(),
        request_backoff: Backoff {
            base: Duration::from_millis(200),
            max: Duration::from_secs(5),
        },
        window_backoff: Backoff {
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
        },
        dead_letters: dead_letters.clone(),
        recorded: tokio::sync::Notify::new(),
    });

    let shutdown = context.shutdown.clone();
    let webhooks = meterline_common::kafka::subscribe(
        &config.kafka,
        SERVICE,
        WEBHOOKS_GROUP,
        &topics.name(Topic::StripeWebhooks),
    )?;
    let windows = meterline_common::kafka::subscribe(
        &config.kafka,
        SERVICE,
        WINDOWS_GROUP,
        &topics.name(Topic::UsageWindows),
    )?;
    let watches = metrics::Watches::new(
        pool.clone(),
        &config.kafka,
        kafka.clone(),
        SERVICE,
        &[
            (Topic::StripeWebhooks, WEBHOOKS_GROUP),
            (Topic::UsageWindows, WINDOWS_GROUP),
        ],
    )?;
    let mut loops = vec![
        tokio::spawn(import::run(importer, shutdown.clone())),
        tokio::spawn(webhook_events::consume(
            mappings,
            reports,
            webhooks,
            dead_letters,
            shutdown.clone(),
        )),
        tokio::spawn(sync::consume_windows(
            sync.clone(),
            windows,
            shutdown.clone(),
        )),
        tokio::spawn(sync::dispatch(sync.clone(), DISPATCHERS, shutdown.clone())),
        tokio::spawn(sync::release_waiting(
            sync,
            Duration::from_secs(1),
            shutdown.clone(),
        )),
        tokio::spawn(metrics::report(watches, GAUGES_EVERY, shutdown.clone())),
    ];
    // Subscription periods are kept as long as the ledger whose windows they bill.
    for table in [
        &ledger::retention::LEDGER,
        &meterline_catalog::billing_periods::PERIODS,
    ] {
        let pruning = retention::run_pruning(
            table,
            pool.clone(),
            config.ledger_retention,
            config.prune_interval,
            shutdown.clone(),
        );
        loops.push(tokio::spawn(
            async move { pruning.await.map_err(Error::from) },
        ));
    }

    let readiness = context.readiness().kafka(kafka).postgres(pool);
    let served = context
        .serve(config.http_addr, routes::router(state), readiness)
        .await;
    context.finish(served, loops).await
}
