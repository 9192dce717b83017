//! Configuration of the ingest service, read once at start.

use std::net::SocketAddr;
use std::time::Duration;

use meterline_common::auth::JwtKeys;
use meterline_common::config::{
    ClickhouseSettings, ConfigError, Env, KafkaSettings, PostgresSettings, ProcessEnv, Source,
};

#[derive(Debug, Clone)]
pub struct Config {
    /// `HTTP_ADDR` (default `0.0.0.0:8080`).
    pub http_addr: SocketAddr,
    pub kafka: KafkaSettings,
    pub postgres: PostgresSettings,
    /// `CLICKHOUSE_URL` (required), `CLICKHOUSE_DATABASE`, `CLICKHOUSE_USER`,
    /// `CLICKHOUSE_PASSWORD`: where `GET /v1/usage` reads window totals. Not a readiness
    /// check: ClickHouse being away must not stop events from being taken.
    pub clickhouse: ClickhouseSettings,
    /// `JWT_SECRET`: verifies bearer tokens.
    pub jwt: JwtKeys,
    pub limits: Limits,
    /// `KAFKA_PRODUCE_TIMEOUT_MS` (default 5000, 100..=60000): how long a write may wait for
    /// Kafka's acknowledgement before the request is answered 503.
    pub produce_timeout: Duration,
}

/// What one request may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `INGEST_MAX_BODY_BYTES` (default 512 KiB): the largest `/v1/events` body and the largest
    /// single event of a bulk request; below Kafka's default 1 MB message limit, so an
    /// accepted event always fits in one message.
    pub max_event_body_bytes: usize,
    /// `INGEST_MAX_BULK_BODY_BYTES` (default 8 MiB): the largest `/v1/events/bulk` body.
    pub max_bulk_body_bytes: usize,
    /// `INGEST_MAX_BULK_EVENTS` (default 2000): the most events in one bulk request.
    pub max_bulk_events: usize,
    /// `INGEST_MAX_FUTURE_SECONDS` (default 300): how far ahead of our clock an event's
    /// timestamp may be (Stripe refuses meter events more than 5 minutes in the future).
    pub max_future: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_body_bytes: 512 << 10,
            max_bulk_body_bytes: 8 << 20,
            max_bulk_events: 2000,
            // Stripe refuses meter events more than 5 minutes ahead.
            max_future: Duration::from_secs(
                meterline_schemas::stripe_limits::MAX_FUTURE.whole_seconds() as u64,
            ),
        }
    }
}

impl Limits {
    /// How far ahead a change of what a meter counts takes effect at the earliest: an event up
    /// to [`Self::max_future`] ahead may already be counted under the old definition
    /// ([`meterline_common::config::Env::change_lead`]).
    pub fn change_lead(&self) -> Duration {
        self.max_future + meterline_common::config::CLOCK_SKEW
    }
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(&ProcessEnv)
    }

    pub fn from_source(source: &dyn Source) -> Result<Self, ConfigError> {
        let env = Env::new(source);
        let defaults = Limits::default();
        Ok(Self {
            http_addr: env.socket_addr_or("HTTP_ADDR", "0.0.0.0:8080")?,
            kafka: KafkaSettings::from_env(&env)?,
            postgres: PostgresSettings::from_env(&env)?,
            clickhouse: ClickhouseSettings::from_env(&env)?,
            jwt: JwtKeys::from_env(&env)?,
            limits: Limits {
                max_event_body_bytes: env.u64_in_range(
                    "INGEST_MAX_BODY_BYTES",
                    defaults.max_event_body_bytes as u64,
                    1024..=(64 << 20),
                )? as usize,
                max_bulk_body_bytes: env.u64_in_range(
                    "INGEST_MAX_BULK_BODY_BYTES",
                    defaults.max_bulk_body_bytes as u64,
                    1024..=(256 << 20),
                )? as usize,
                max_bulk_events: env.u64_in_range(
                    "INGEST_MAX_BULK_EVENTS",
                    defaults.max_bulk_events as u64,
                    1..=100_000,
                )? as usize,
                max_future: env.max_future()?,
            },
            produce_timeout: env.produce_timeout()?,
        })
    }
}
