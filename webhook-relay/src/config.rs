//! Configuration of the webhook-relay service, read once at start.

use std::net::SocketAddr;
use std::time::Duration;

use meterline_accounts::crypto::Keyring;
use meterline_accounts::stripe_config::WebhookSecret;
use meterline_common::config::{
    ConfigError, Env, KafkaSettings, PostgresSettings, ProcessEnv, Source,
};
use meterline_common::retention::{self, RetentionDays};

use crate::sources::{Networks, SourcePolicy};

#[derive(Debug, Clone)]
pub struct Config {
    /// `HTTP_ADDR` (default `0.0.0.0:8082`).
    pub http_addr: SocketAddr,
    pub kafka: KafkaSettings,
    pub postgres: PostgresSettings,
    /// `ENCRYPTION_KEYS` (required): decrypts the tenants' webhook secrets.
    pub keys: Keyring,
    /// `STRIPE_WEBHOOK_SECRET` (optional): the secret used for a tenant environment whose
    /// Stripe configuration lists no webhook secrets. Never for a tenant environment without
    /// any configuration: that address does not exist.
    pub fallback_secret: Option<WebhookSecret>,
    /// `WEBHOOK_TOLERANCE_SECONDS` (default 300, Stripe's own default; 1..=3600): how far the
    /// signed timestamp may be from our clock, either way.
    pub tolerance: Duration,
    /// `WEBHOOK_MAX_BODY_BYTES` (default 256 KiB, 1 KiB..=900 KiB): the largest body accepted.
    /// The upper bound keeps a relayed event under Kafka's default 1 MB message limit.
    pub max_body_bytes: usize,
    /// `KAFKA_PRODUCE_TIMEOUT_MS` (default 5000, 100..=60000): how long a publish may wait for
    /// Kafka's acknowledgement before the delivery is answered 503 (Stripe then retries).
    pub produce_timeout: Duration,
    /// `WEBHOOK_ALLOWED_SOURCES` (optional, comma-separated CIDRs or addresses): when set, only
    /// deliveries from these networks are taken (Stripe publishes its webhook addresses);
    /// `WEBHOOK_TRUSTED_PROXIES` (optional, only with the former): the proxies whose
    /// `X-Forwarded-For` is believed. `None`: every source is accepted.
    pub sources: Option<SourcePolicy>,
    /// `RETENTION_WEBHOOK_DELIVERIES_DAYS`: how long the relay keeps its deduplication records
    /// ([`crate::deliveries::DELIVERIES`]), pruned every `RETENTION_PRUNE_INTERVAL_SECONDS`.
    pub retention: RetentionDays,
    pub prune_interval: Duration,
}

fn networks(env: &Env<'_>, var: &'static str) -> Result<Option<Networks>, ConfigError> {
    env.optional(var)
        .map(|text| Networks::parse(&text).map_err(|reason| ConfigError::Malformed { var, reason }))
        .transpose()
}

fn source_policy(env: &Env<'_>) -> Result<Option<SourcePolicy>, ConfigError> {
    let allowed = networks(env, "WEBHOOK_ALLOWED_SOURCES")?;
    let trusted_proxies = networks(env, "WEBHOOK_TRUSTED_PROXIES")?;
    match (allowed, trusted_proxies) {
        (Some(allowed), trusted_proxies) => Ok(Some(SourcePolicy {
            allowed,
            trusted_proxies,
        })),
        // Trusting a proxy's header matters only to the allow-list: alone it is a mistake
        // (most likely a forgotten allow-list), so say so rather than run unprotected.
        (None, Some(_)) => Err(ConfigError::Malformed {
            var: "WEBHOOK_TRUSTED_PROXIES",
            reason: "set WEBHOOK_ALLOWED_SOURCES too: trusted proxies only serve the allow-list"
                .into(),
        }),
        (None, None) => Ok(None),
    }
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(&ProcessEnv)
    }

    pub fn from_source(source: &dyn Source) -> Result<Self, ConfigError> {
        let env = Env::new(source);
        let fallback_secret = env
            .optional("STRIPE_WEBHOOK_SECRET")
            .map(|value| {
                // The value is not echoed: it is a secret.
                WebhookSecret::parse(&value).map_err(|reason| ConfigError::Malformed {
                    var: "STRIPE_WEBHOOK_SECRET",
                    reason: reason.to_owned(),
                })
            })
            .transpose()?;
        Ok(Self {
            http_addr: env.socket_addr_or("HTTP_ADDR", "0.0.0.0:8082")?,
            kafka: KafkaSettings::from_env(&env)?,
            postgres: PostgresSettings::from_env(&env)?,
            keys: Keyring::from_env(&env)?,
            fallback_secret,
            tolerance: env.seconds_in_range("WEBHOOK_TOLERANCE_SECONDS", 300, 1..=3600)?,
            max_body_bytes: env.u64_in_range(
                "WEBHOOK_MAX_BODY_BYTES",
                256 << 10,
                1024..=(900 << 10),
            )? as usize,
            produce_timeout: env.produce_timeout()?,
            sources: source_policy(&env)?,
            retention: crate::deliveries::DELIVERIES.retention_from_env(&env)?,
            prune_interval: retention::prune_interval_from_env(&env)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: [(&str, &str); 3] = [
        ("KAFKA_BROKERS", "127.0.0.1:9092"),
        ("DATABASE_URL", "postgres://u:p@h/d"),
        (
            "ENCRYPTION_KEYS",
            "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ),
    ];

    /// The config read from [`BASE`] and `extra`: each test names only what it varies.
    fn with(extra: &[(&'static str, &'static str)]) -> Result<Config, ConfigError> {
        struct Vars<'a>(&'a [(&'static str, &'static str)]);
        impl Source for Vars<'_> {
            fn get(&self, var: &str) -> Option<String> {
                BASE.iter()
                    .chain(self.0)
                    .find(|(k, _)| *k == var)
                    .map(|(_, v)| (*v).to_owned())
            }
        }
        Config::from_source(&Vars(extra))
    }

    #[test]
    fn defaults() {
        let config = with(&[]).unwrap();
        assert_eq!(config.tolerance, Duration::from_secs(300));
        assert_eq!(config.max_body_bytes, 256 * 1024);
        assert_eq!(config.produce_timeout, Duration::from_millis(5000));
        assert!(config.fallback_secret.is_none());
        assert_eq!(config.http_addr.port(), 8082);
        assert!(config.sources.is_none(), "the allow-list is off by default");
        assert_eq!(config.retention.days(), 90);
        assert_eq!(config.prune_interval, Duration::from_secs(3600));
    }

    #[test]
    fn retention_below_the_floor_is_refused() {
        let var = "RETENTION_WEBHOOK_DELIVERIES_DAYS";
        let err = with(&[(var, "34")]).unwrap_err().to_string();
        assert!(err.contains(var), "{err}");
        // The ledger is the sink's: the relay does not read its retention.
        assert!(with(&[("RETENTION_LEDGER_DAYS", "34")]).is_ok());
    }

    #[test]
    fn the_allow_list_and_trusted_proxies() {
        let policy = with(&[
            ("WEBHOOK_ALLOWED_SOURCES", "3.18.12.63/32, 3.130.192.231"),
            ("WEBHOOK_TRUSTED_PROXIES", "10.0.0.0/8"),
        ])
        .unwrap()
        .sources
        .unwrap();
        assert!(policy.allowed.contains("3.130.192.231".parse().unwrap()));
        assert!(policy.trusted_proxies.is_some());

        let err = with(&[("WEBHOOK_ALLOWED_SOURCES", "3.18.12.63/40")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("WEBHOOK_ALLOWED_SOURCES"), "{err}");

        let err = with(&[("WEBHOOK_TRUSTED_PROXIES", "10.0.0.0/8")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("WEBHOOK_TRUSTED_PROXIES"), "{err}");
    }

    #[test]
    fn encryption_keys_are_required() {
        let src = [
            ("KAFKA_BROKERS", "127.0.0.1:9092"),
            ("DATABASE_URL", "postgres://u:p@h/d"),
        ];
        assert_eq!(
            Config::from_source(&src).unwrap_err(),
            ConfigError::Missing {
                var: "ENCRYPTION_KEYS"
            }
        );
    }

    #[test]
    fn a_malformed_fallback_secret_is_named_not_echoed() {
        let err = with(&[("STRIPE_WEBHOOK_SECRET", "hunter2hunter2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("STRIPE_WEBHOOK_SECRET"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let config = with(&[("STRIPE_WEBHOOK_SECRET", "whsec_abcdefgh1234")]).unwrap();
        assert!(config.fallback_secret.is_some());
    }

    #[test]
    fn limits_are_range_checked() {
        for (var, value) in [
            ("WEBHOOK_TOLERANCE_SECONDS", "0"),
            ("WEBHOOK_MAX_BODY_BYTES", "2000000"),
            ("KAFKA_PRODUCE_TIMEOUT_MS", "5"),
        ] {
            let err = with(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(var), "{err}");
        }
    }
}
