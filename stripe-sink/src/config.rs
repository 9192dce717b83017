//! Configuration of the stripe-sink service, read once at start.

use std::net::SocketAddr;
use std::time::Duration;

use meterline_accounts::crypto::Keyring;
use meterline_common::auth::JwtKeys;
use meterline_common::config::{
    require_scheme, ConfigError, Env, KafkaSettings, PostgresSettings, ProcessEnv, Source,
};
use meterline_common::retention::{self, RetentionDays};

#[derive(Debug, Clone)]
pub struct Config {
    /// `HTTP_ADDR` (default `0.0.0.0:8081`).
    pub http_addr: SocketAddr,
    pub kafka: KafkaSettings,
    pub postgres: PostgresSettings,
    /// `JWT_SECRET`: verifies bearer tokens of the control API.
    pub jwt: JwtKeys,
    /// `ENCRYPTION_KEYS`: encrypts Stripe keys and webhook secrets at rest.
    pub keys: Keyring,
    pub stripe: StripeSettings,
    /// `RETENTION_LEDGER_DAYS` (default 400): how long completed ledger rows are kept
    /// ([`crate::ledger::retention`]), pruned every `RETENTION_PRUNE_INTERVAL_SECONDS`
    /// (default 3600).
    pub ledger_retention: RetentionDays,
    pub prune_interval: Duration,
    /// How far ahead of now a window size change takes effect at the earliest: the ingest's
    /// `INGEST_MAX_FUTURE_SECONDS` (default 300, read here too: set it to the same value for
    /// both services) plus a minute of clock skew ([`Env::change_lead`]). An event may be that
    /// far ahead and already counted in a window of the old size, which must not change size
    /// under it.
    pub window_change_lead: Duration,
}

/// How the sink talks to Stripe.
#[derive(Debug, Clone)]
pub struct StripeSettings {
    /// `STRIPE_INTEGRATION_ENABLED` (default true): when false, window totals are recorded in
    /// the ledger but nothing is sent to Stripe.
    pub enabled: bool,
    /// `STRIPE_API_BASE` (default `https://api.stripe.com`): tests and the demo point it at
    /// the local stand-in.
    pub api_base: String,
    /// `STRIPE_API_TIMEOUT_SECONDS` (default 30): one request's time limit.
    pub timeout: Duration,
    /// `STRIPE_MAX_RETRIES` (default 5): retries of one request on 429, 5xx and timeouts
    /// before the batch waits for the next attempt.
    pub max_retries: u32,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(&ProcessEnv)
    }

    pub fn from_source(source: &dyn Source) -> Result<Self, ConfigError> {
        let env = Env::new(source);
        let api_base = env.string_or("STRIPE_API_BASE", "https://api.stripe.com");
        require_scheme(
            "STRIPE_API_BASE",
            &api_base,
            &["https://", "http://"],
            "an http(s)://",
        )?;
        Ok(Self {
            http_addr: env.socket_addr_or("HTTP_ADDR", "0.0.0.0:8081")?,
            kafka: KafkaSettings::from_env(&env)?,
            postgres: PostgresSettings::from_env(&env)?,
            jwt: JwtKeys::from_env(&env)?,
            keys: Keyring::from_env(&env)?,
            stripe: StripeSettings {
                enabled: env.bool_or("STRIPE_INTEGRATION_ENABLED", true)?,
                api_base: api_base.trim_end_matches('/').to_owned(),
                timeout: env.seconds_in_range("STRIPE_API_TIMEOUT_SECONDS", 30, 1..=300)?,
                max_retries: env.u64_in_range("STRIPE_MAX_RETRIES", 5, 0..=20)? as u32,
            },
            ledger_retention: crate::ledger::retention::LEDGER.retention_from_env(&env)?,
            prune_interval: retention::prune_interval_from_env(&env)?,
            window_change_lead: env.change_lead()?,
        })
    }
}
