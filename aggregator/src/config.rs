//! Configuration of the aggregator service, read once at start.

use std::net::SocketAddr;
use std::time::Duration;

use meterline_common::config::{
    ClickhouseSettings, ConfigError, Env, KafkaSettings, PostgresSettings, ProcessEnv, Source,
};
use meterline_common::retention::{self, RetentionDays};

#[derive(Debug, Clone)]
pub struct Config {
    /// `HTTP_ADDR` (default `0.0.0.0:8083`): operations routes only.
    pub http_addr: SocketAddr,
    pub kafka: KafkaSettings,
    pub clickhouse: ClickhouseSettings,
    pub postgres: PostgresSettings,
    /// `STRIPE_SYNC_GRACE_PERIOD_MINUTES` (default 5): a window is due this long after its end,
    /// so events that arrive a little late still make its first publication.
    pub grace: Duration,
    /// `AGGREGATOR_GROUP_ID` (default `meterline-aggregator`): the consumer group of
    /// `usage.raw`; replicas share it. Resync requests use `<group>-resync`.
    pub group_id: String,
    pub batch: BatchLimits,
    /// `AGGREGATOR_PUBLISH_INTERVAL_MS` (default 1000): how often due windows are looked for.
    pub publish_interval: Duration,
    /// `RETENTION_WINDOWS_DAYS` (default 400, at least 42): how long the window registry
    /// keeps a finished window ([`crate::windows::WINDOWS`]).
    pub windows_retention: RetentionDays,
    /// `RETENTION_PRUNE_INTERVAL_SECONDS` (default 3600): how often it prunes.
    pub prune_interval: Duration,
}

/// Bounds of one batch from `usage.raw` into ClickHouse: whichever is reached first.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// `AGGREGATOR_BATCH_MAX_EVENTS` (default 50000).
    pub max_events: usize,
    /// `AGGREGATOR_BATCH_MAX_WAIT_MS` (default 1000): the longest an event waits in a batch.
    pub max_wait: Duration,
}

/// `AGGREGATOR_GROUP_ID` (default `meterline-aggregator`), also read by `meterline migrate`
/// to see that no aggregator runs.
pub fn group_id_from_env(env: &Env<'_>) -> String {
    env.string_or("AGGREGATOR_GROUP_ID", "meterline-aggregator")
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(&ProcessEnv)
    }

    pub fn from_source(source: &dyn Source) -> Result<Self, ConfigError> {
        let env = Env::new(source);
        Ok(Self {
            http_addr: env.socket_addr_or("HTTP_ADDR", "0.0.0.0:8083")?,
            kafka: KafkaSettings::from_env(&env)?,
            clickhouse: ClickhouseSettings::from_env(&env)?,
            postgres: PostgresSettings::from_env(&env)?,
            grace: Duration::from_secs(
                60 * env.u64_in_range("STRIPE_SYNC_GRACE_PERIOD_MINUTES", 5, 0..=1440)?,
            ),
            group_id: group_id_from_env(&env),
            batch: BatchLimits {
                max_events: env.u64_in_range(
                    "AGGREGATOR_BATCH_MAX_EVENTS",
                    50_000,
                    1..=1_000_000,
                )? as usize,
                max_wait: env.millis_in_range("AGGREGATOR_BATCH_MAX_WAIT_MS", 1000, 10..=60_000)?,
            },
            publish_interval: env.millis_in_range(
                "AGGREGATOR_PUBLISH_INTERVAL_MS",
                1000,
                50..=60_000,
            )?,
            windows_retention: crate::windows::WINDOWS.retention_from_env(&env)?,
            prune_interval: retention::prune_interval_from_env(&env)?,
        })
    }
}
