//! Typed configuration from environment variables.
//!
//! Every service reads its settings once at start into one struct built from these helpers.
//! A missing or malformed variable is a [`ConfigError`] that names the variable, so the
//! operator sees exactly what to fix; the services print it as one line and exit with code 2.

use std::fmt::Display;
use std::net::SocketAddr;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {var} is required but not set")]
    Missing { var: &'static str },
    #[error("invalid configuration: {var} is malformed: {reason}")]
    Malformed { var: &'static str, reason: String },
}

/// The accepted values of a numeric variable.
type Range = std::ops::RangeInclusive<u64>;
/// A duration read from a variable.
type DurationVar = Result<std::time::Duration, ConfigError>;

/// A source of variables: the process environment in services, a map in tests.
pub trait Source {
    fn get(&self, var: &str) -> Option<String>;

    /// Every variable whose name starts with `prefix`, for pass-through settings
    /// (`KAFKA_PROPERTY_*`). None by default.
    fn with_prefix(&self, _prefix: &str) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// The process environment.
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, var: &str) -> Option<String> {
        std::env::var(var).ok()
    }

    fn with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        std::env::vars()
            .filter(|(k, _)| k.starts_with(prefix))
            .collect()
    }
}

impl<const N: usize> Source for [(&str, &str); N] {
    fn get(&self, var: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == var)
            .map(|(_, v)| (*v).to_owned())
    }

    fn with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        self.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }
}

/// The clock difference between services that a change of how events are windowed or counted
/// allows for ([`Env::change_lead`]).
pub const CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(60);

/// Reads variables from a [`Source`]. An empty value counts as unset: `FOO=` in an env file
/// is a forgotten value far more often than a deliberate empty string.
pub struct Env<'a> {
    source: &'a dyn Source,
}

impl<'a> Env<'a> {
    pub fn new(source: &'a dyn Source) -> Self {
        Self { source }
    }

    fn raw(&self, var: &str) -> Option<String> {
        self.source.get(var).filter(|v| !v.trim().is_empty())
    }

    pub fn required(&self, var: &'static str) -> Result<String, ConfigError> {
        self.raw(var).ok_or(ConfigError::Missing { var })
    }

    pub fn optional(&self, var: &'static str) -> Option<String> {
        self.raw(var)
    }

    /// Every variable whose name starts with `prefix`, with its value.
    pub fn with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        self.source.with_prefix(prefix)
    }

    pub fn string_or(&self, var: &'static str, default: &str) -> String {
        self.raw(var).unwrap_or_else(|| default.to_owned())
    }

    /// A variable that may be empty on purpose (such as `TOPIC_PREFIX`).
    pub fn string_or_empty(&self, var: &'static str) -> String {
        self.source.get(var).unwrap_or_default()
    }

    pub fn parse_or<T>(&self, var: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.raw(var) {
            None => Ok(default),
            Some(v) => parse_value(var, &v),
        }
    }

    pub fn parse_required<T>(&self, var: &'static str) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        parse_value(var, &self.required(var)?)
    }

    /// A number that must lie in `range`, so a typo such as `0` or `6000` fails at start.
    pub fn u64_in_range(
        &self,
        var: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let value: u64 = self.parse_or(var, default)?;
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(ConfigError::Malformed {
                var,
                reason: format!("{value} is outside {}..={}", range.start(), range.end()),
            })
        }
    }

    /// A duration in milliseconds (`*_MS` variables), in `range`.
    pub fn millis_in_range(&self, var: &'static str, default: u64, range: Range) -> DurationVar {
        Ok(std::time::Duration::from_millis(
            self.u64_in_range(var, default, range)?,
        ))
    }

    /// A duration in whole seconds (`*_SECONDS` variables), in `range`.
    pub fn seconds_in_range(&self, var: &'static str, default: u64, range: Range) -> DurationVar {
        Ok(std::time::Duration::from_secs(
            self.u64_in_range(var, default, range)?,
        ))
    }

    /// `INGEST_MAX_FUTURE_SECONDS` (default 300, Stripe's 5 minutes; 0..=86400): how far ahead
    /// of the clock an accepted event's timestamp may be. Ingest enforces it; the sink
    /// schedules window size changes past it.
    pub fn max_future(&self) -> DurationVar {
        self.seconds_in_range(
            "INGEST_MAX_FUTURE_SECONDS",
            meterline_schemas::stripe_limits::MAX_FUTURE.whole_seconds() as u64,
            0..=86_400,
        )
    }

    /// How far ahead of now a change of how events are windowed or counted (a window size, a
    /// meter's aggregation) takes effect at the earliest: [`Self::max_future`] plus
    /// [`CLOCK_SKEW`]. An event may be that far ahead and already counted under the old rule,
    /// which must not change under it.
    pub fn change_lead(&self) -> DurationVar {
        Ok(self.max_future()? + CLOCK_SKEW)
    }

    /// `KAFKA_PRODUCE_TIMEOUT_MS` (default 5000, 100..=60000): how long a write on behalf of a
    /// request may wait for Kafka's acknowledgement before the request is answered 503.
    pub fn produce_timeout(&self) -> DurationVar {
        self.millis_in_range("KAFKA_PRODUCE_TIMEOUT_MS", 5000, 100..=60_000)
    }

    pub fn socket_addr_or(
        &self,
        var: &'static str,
        default: &str,
    ) -> Result<SocketAddr, ConfigError> {
        parse_value(var, &self.string_or(var, default))
    }

    /// A boolean written as true/false, 1/0, yes/no or on/off.
    pub fn bool_or(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(var).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) => match v.as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(ConfigError::Malformed {
                    var,
                    reason: format!("expected true or false, got {v:?}"),
                }),
            },
        }
    }
}

fn parse_value<T>(var: &'static str, value: &str) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: Display,
{
    value
        .trim()
        .parse()
        .map_err(|e: T::Err| ConfigError::Malformed {
            var,
            reason: e.to_string(),
        })
}

/// Where Kafka is, how our topics are named, and how clients prove who they are.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `KAFKA_BROKERS`: comma-separated `host:port` list.
    pub brokers: String,
    /// `TOPIC_PREFIX`: prepended to every topic name (default empty); lets several
    /// deployments or test runs share one cluster.
    pub topic_prefix: String,
    /// TLS, SASL and the librdkafka properties passed through.
    pub security: KafkaSecurity,
}

/// How every Kafka client connects: `KAFKA_SECURITY_PROTOCOL` (`plaintext`, `ssl`,
/// `sasl_plaintext`, `sasl_ssl`), with SASL `KAFKA_SASL_MECHANISM` (`PLAIN`, `SCRAM-SHA-256`,
/// `SCRAM-SHA-512`), `KAFKA_SASL_USERNAME` and `KAFKA_SASL_PASSWORD`, and with TLS
/// `KAFKA_SSL_CA_LOCATION` (default: the system's CA store), `KAFKA_SSL_CERTIFICATE_LOCATION`,
/// `KAFKA_SSL_KEY_LOCATION` and `KAFKA_SSL_KEY_PASSWORD` (mutual TLS). The broker's host name
/// is verified against its certificate (librdkafka's default). `KAFKA_PROPERTY_<NAME>` sets any
/// other librdkafka property: `<NAME>` lowercased, `_` read as `.`
/// (`KAFKA_PROPERTY_SOCKET_KEEPALIVE_ENABLE=true`). The password never leaves this value but
/// into the client: `Debug` masks it and every property whose name says secret.
#[derive(Clone, Default)]
pub struct KafkaSecurity {
    /// librdkafka properties, in the order set: protocol, SASL, TLS, then the pass-through.
    properties: Vec<(String, String)>,
}

/// Property names whose values are secrets: masked by `Debug`.
fn is_secret_property(name: &str) -> bool {
    name.contains("password") || name.contains("secret") || name.ends_with(".key.pem")
}

impl KafkaSecurity {
    pub fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let protocol = env
            .string_or("KAFKA_SECURITY_PROTOCOL", "plaintext")
            .to_ascii_lowercase();
        let (tls, sasl) = match protocol.as_str() {
            "plaintext" => (false, false),
            "ssl" => (true, false),
            "sasl_plaintext" => (false, true),
            "sasl_ssl" => (true, true),
            _ => {
                return Err(ConfigError::Malformed {
                    var: "KAFKA_SECURITY_PROTOCOL",
                    reason: "expected plaintext, ssl, sasl_plaintext or sasl_ssl".into(),
                })
            }
        };
        let mut properties = vec![("security.protocol".to_owned(), protocol)];
        let mut set = |name: &str, value: String| properties.push((name.to_owned(), value));
        if sasl {
            let mechanism = env.required("KAFKA_SASL_MECHANISM")?.to_ascii_uppercase();
            if !matches!(
                mechanism.as_str(),
                "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512"
            ) {
                return Err(ConfigError::Malformed {
                    var: "KAFKA_SASL_MECHANISM",
                    reason: "expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512".into(),
                });
            }
            set("sasl.mechanism", mechanism);
            set("sasl.username", env.required("KAFKA_SASL_USERNAME")?);
            set("sasl.password", env.required("KAFKA_SASL_PASSWORD")?);
        } else {
            for var in [
                "KAFKA_SASL_MECHANISM",
                "KAFKA_SASL_USERNAME",
                "KAFKA_SASL_PASSWORD",
            ] {
                if env.optional(var).is_some() {
                    return Err(ConfigError::Malformed {
                        var,
                        reason: "set, but KAFKA_SECURITY_PROTOCOL is not sasl_plaintext or \
                                 sasl_ssl"
                            .into(),
                    });
                }
            }
        }
        if tls {
            // The system's CA store unless a CA file is given: the TLS library built into
            // the binary knows no store of its own.
            set(
                "ssl.ca.location",
                env.string_or("KAFKA_SSL_CA_LOCATION", "probe"),
            );
            for (var, name) in [
                ("KAFKA_SSL_CERTIFICATE_LOCATION", "ssl.certificate.location"),
                ("KAFKA_SSL_KEY_LOCATION", "ssl.key.location"),
                ("KAFKA_SSL_KEY_PASSWORD", "ssl.key.password"),
            ] {
                if let Some(value) = env.optional(var) {
                    set(name, value);
                }
            }
        }
        let mut passed: Vec<(String, String)> = env
            .with_prefix("KAFKA_PROPERTY_")
            .into_iter()
            .filter(|(_, v)| !v.trim().is_empty())
            .map(|(k, v)| {
                let name = k["KAFKA_PROPERTY_".len()..]
                    .to_ascii_lowercase()
                    .replace('_', ".");
                (name, v)
            })
            .collect();
        passed.sort();
        properties.extend(passed);
        Ok(Self { properties })
    }

    /// The librdkafka properties to set on every client.
    pub fn properties(&self) -> &[(String, String)] {
        &self.properties
    }
}

impl std::fmt::Debug for KafkaSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut map = f.debug_map();
        for (name, value) in &self.properties {
            if is_secret_property(name) {
                map.entry(name, &"<redacted>");
            } else {
                map.entry(name, value);
            }
        }
        map.finish()
    }
}

impl KafkaSettings {
    pub fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let brokers = env.required("KAFKA_BROKERS")?;
        if brokers.split(',').any(|b| {
            let b = b.trim();
            b.is_empty() || !b.contains(':')
        }) {
            return Err(ConfigError::Malformed {
                var: "KAFKA_BROKERS",
                reason: "expected a comma-separated list of host:port".into(),
            });
        }
        let topic_prefix = env.string_or_empty("TOPIC_PREFIX");
        if !topic_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(ConfigError::Malformed {
                var: "TOPIC_PREFIX",
                reason: "only ASCII letters, digits, '.', '_' and '-' are allowed in topic names"
                    .into(),
            });
        }
        Ok(Self {
            brokers,
            topic_prefix,
            security: KafkaSecurity::from_env(env)?,
        })
    }
}

/// Refuses a URL whose scheme is not one of `schemes`; the message says "expected {what} URL"
/// and never echoes the value, which may hold a password.
pub fn require_scheme(
    var: &'static str,
    url: &str,
    schemes: &[&str],
    what: &str,
) -> Result<(), ConfigError> {
    if schemes.iter().any(|scheme| url.starts_with(scheme)) {
        Ok(())
    } else {
        Err(ConfigError::Malformed {
            var,
            reason: format!("expected {what} URL"),
        })
    }
}

/// Where ClickHouse is.
#[derive(Clone)]
pub struct ClickhouseSettings {
    /// `CLICKHOUSE_URL`: the HTTP interface, such as `http://127.0.0.1:8123`. On a cluster,
    /// any node (or a load balancer in front of them): it runs each query across the shards.
    pub url: String,
    /// `CLICKHOUSE_DATABASE`: our own database (default `meterline`).
    pub database: String,
    /// `CLICKHOUSE_USER` / `CLICKHOUSE_PASSWORD`: optional credentials.
    pub user: Option<String>,
    pub password: Option<String>,
    /// `CLICKHOUSE_CLUSTER` and its companions: the tables are sharded over this cluster.
    /// `None`: one server holds every table.
    pub cluster: Option<ClickhouseCluster>,
    /// `CLICKHOUSE_CA_CERT`: the certificate authorities an `https://` server's certificate
    /// is checked against, instead of the Mozilla roots built in. `None`: those roots.
    pub ca_certificates: Option<CaCertificates>,
}

/// Certificate authorities read from a PEM file once, at start: a file that is missing or
/// holds no certificate stops the service with one line naming the variable.
#[derive(Clone)]
pub struct CaCertificates {
    pub path: String,
    pub certificates: Vec<rustls_pki_types::CertificateDer<'static>>,
}

impl CaCertificates {
    pub fn read(var: &'static str, path: &str) -> Result<Self, ConfigError> {
        use rustls_pki_types::pem::PemObject;
        let malformed = |reason: String| ConfigError::Malformed { var, reason };
        let certificates = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| malformed(format!("cannot read {path}: {e}")))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| malformed(format!("{path} is not PEM certificates: {e}")))?;
        if certificates.is_empty() {
            return Err(malformed(format!("{path} holds no certificate")));
        }
        Ok(Self {
            path: path.to_owned(),
            certificates,
        })
    }
}

impl std::fmt::Debug for CaCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} certificates)",
            self.path,
            self.certificates.len()
        )
    }
}

/// The password is a secret: `Debug` shows only whether there is one.
impl std::fmt::Debug for ClickhouseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickhouseSettings")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("cluster", &self.cluster)
            .field("ca_certificates", &self.ca_certificates)
            .finish()
    }
}

/// A ClickHouse cluster that meterline's tables are sharded over, as named in the servers'
/// `<remote_servers>`: a local table on every node, and a `Distributed` table over them
/// sharded on the customer (`clickhouse::cluster` says why).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClickhouseCluster {
    /// `CLICKHOUSE_CLUSTER`: the cluster's name.
    pub name: String,
    /// `CLICKHOUSE_CLUSTER_ENGINE` (and `CLICKHOUSE_CLUSTER_NODES` for `plain`).
    pub engine: ClusterEngine,
}

/// How the replicas of a shard are kept equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEngine {
    /// `replicated` (the default, what production runs): `Replicated*MergeTree` tables kept
    /// equal by ClickHouse Keeper, created once for the whole cluster with `ON CLUSTER`; the
    /// cluster sets `<internal_replication>true</internal_replication>`.
    Replicated,
    /// `plain`: plain `*MergeTree` tables, and the `Distributed` table writes every replica
    /// itself (`<internal_replication>false</internal_replication>`). For clusters without
    /// Keeper, such as the loopback test cluster. No `ON CLUSTER` either: the DDL runs on
    /// each node, so every node's HTTP URL is listed (`CLICKHOUSE_CLUSTER_NODES`).
    Plain { nodes: Vec<String> },
}

impl ClickhouseCluster {
    /// `None` when `CLICKHOUSE_CLUSTER` is unset (and then its companions must be too).
    pub fn from_env(env: &Env<'_>) -> Result<Option<Self>, ConfigError> {
        let engine = env.optional("CLICKHOUSE_CLUSTER_ENGINE");
        let nodes = env.optional("CLICKHOUSE_CLUSTER_NODES");
        let Some(name) = env.optional("CLICKHOUSE_CLUSTER") else {
            for (var, value) in [
                ("CLICKHOUSE_CLUSTER_ENGINE", &engine),
                ("CLICKHOUSE_CLUSTER_NODES", &nodes),
            ] {
                if value.is_some() {
                    return Err(ConfigError::Malformed {
                        var,
                        reason: "set only with CLICKHOUSE_CLUSTER".into(),
                    });
                }
            }
            return Ok(None);
        };
        if !is_identifier(&name) {
            return Err(ConfigError::Malformed {
                var: "CLICKHOUSE_CLUSTER",
                reason: "expected letters, digits and '_' only, starting with a letter".into(),
            });
        }
        let engine = match (engine.as_deref().unwrap_or("replicated"), nodes) {
            ("replicated", None) => ClusterEngine::Replicated,
            ("replicated", Some(_)) => {
                return Err(ConfigError::Malformed {
                    var: "CLICKHOUSE_CLUSTER_NODES",
                    reason: "only for CLICKHOUSE_CLUSTER_ENGINE=plain: replicated tables are \
                             created once for the whole cluster with ON CLUSTER"
                        .into(),
                })
            }
            ("plain", None) => {
                return Err(ConfigError::Missing {
                    var: "CLICKHOUSE_CLUSTER_NODES",
                })
            }
            ("plain", Some(list)) => {
                let nodes: Vec<String> = list.split(',').map(|n| n.trim().to_owned()).collect();
                for node in &nodes {
                    require_scheme(
                        "CLICKHOUSE_CLUSTER_NODES",
                        node,
                        &["http://", "https://"],
                        "a comma-separated list of http:// or https://",
                    )?;
                }
                ClusterEngine::Plain { nodes }
            }
            (other, _) => {
                return Err(ConfigError::Malformed {
                    var: "CLICKHOUSE_CLUSTER_ENGINE",
                    reason: format!("expected replicated or plain, not {other:?}"),
                })
            }
        };
        Ok(Some(Self { name, engine }))
    }
}

impl ClickhouseSettings {
    pub fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let url = env.required("CLICKHOUSE_URL")?;
        require_scheme(
            "CLICKHOUSE_URL",
            &url,
            &["http://", "https://"],
            "an http:// or https://",
        )?;
        let database = env.string_or("CLICKHOUSE_DATABASE", "meterline");
        if !is_identifier(&database) {
            return Err(ConfigError::Malformed {
                var: "CLICKHOUSE_DATABASE",
                reason: "expected letters, digits and '_' only, starting with a letter".into(),
            });
        }
        Ok(Self {
            url,
            database,
            user: env.optional("CLICKHOUSE_USER"),
            password: env.optional("CLICKHOUSE_PASSWORD"),
            cluster: ClickhouseCluster::from_env(env)?,
            ca_certificates: env
                .optional("CLICKHOUSE_CA_CERT")
                .map(|path| CaCertificates::read("CLICKHOUSE_CA_CERT", &path))
                .transpose()?,
        })
    }
}

/// Where PostgreSQL is.
#[derive(Clone)]
pub struct PostgresSettings {
    /// `DATABASE_URL`: a `postgres://` URL. Holds a password: never logged, see `Debug`.
    pub url: String,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &"<redacted>")
            .finish()
    }
}

impl PostgresSettings {
    pub fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let url = env.required("DATABASE_URL")?;
        require_scheme(
            "DATABASE_URL",
            &url,
            &["postgres://", "postgresql://"],
            "a postgres://",
        )?;
        Ok(Self { url })
    }
}

/// An identifier safe to splice into SQL as a database or table name.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 63
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Variables of a case whose length differs from its neighbours'.
    struct Vars<'a>(&'a [(&'a str, &'a str)]);

    impl Source for Vars<'_> {
        fn get(&self, var: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(k, _)| *k == var)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn kafka_security_becomes_librdkafka_properties_and_never_shows_the_password() {
        let env = [
            ("KAFKA_BROKERS", "b:9093"),
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_MECHANISM", "scram-sha-512"),
            ("KAFKA_SASL_USERNAME", "meterline"),
            ("KAFKA_SASL_PASSWORD", "hunter2-secret"),
            ("KAFKA_PROPERTY_SOCKET_KEEPALIVE_ENABLE", "true"),
        ];
        let settings = KafkaSettings::from_env(&Env::new(&env)).unwrap();
        let properties: Vec<(&str, &str)> = settings
            .security
            .properties()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            properties,
            [
                ("security.protocol", "sasl_ssl"),
                ("sasl.mechanism", "SCRAM-SHA-512"),
                ("sasl.username", "meterline"),
                ("sasl.password", "hunter2-secret"),
                ("ssl.ca.location", "probe"),
                ("socket.keepalive.enable", "true"),
            ]
        );
        let shown = format!("{settings:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("sasl.username"), "{shown}");

        let plaintext = KafkaSettings::from_env(&Env::new(&[("KAFKA_BROKERS", "b:9092")])).unwrap();
        assert_eq!(
            plaintext.security.properties(),
            [("security.protocol".to_owned(), "plaintext".to_owned())]
        );
    }

    #[test]
    fn kafka_security_that_cannot_work_is_refused_by_name() {
        let cases: [(&[(&str, &str)], &str); 4] = [
            (
                &[("KAFKA_SECURITY_PROTOCOL", "tls")],
                "KAFKA_SECURITY_PROTOCOL",
            ),
            (
                &[("KAFKA_SECURITY_PROTOCOL", "sasl_ssl")],
                "KAFKA_SASL_MECHANISM",
            ),
            (
                &[
                    ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
                    ("KAFKA_SASL_MECHANISM", "GSSAPI"),
                ],
                "KAFKA_SASL_MECHANISM",
            ),
            (
                &[("KAFKA_SASL_USERNAME", "meterline")],
                "KAFKA_SASL_USERNAME",
            ),
        ];
        for (vars, named) in cases {
            let mut all = vec![("KAFKA_BROKERS", "b:9092")];
            all.extend_from_slice(vars);
            let err = KafkaSettings::from_env(&Env::new(&Vars(&all))).unwrap_err();
            assert!(err.to_string().contains(named), "{vars:?}: {err}");
        }
    }

    #[test]
    fn a_clickhouse_ca_file_that_is_missing_or_holds_no_certificate_is_refused_by_name() {
        let missing = [
            ("CLICKHOUSE_URL", "https://h:8443"),
            ("CLICKHOUSE_CA_CERT", "/nonexistent/ca.pem"),
        ];
        let err = ClickhouseSettings::from_env(&Env::new(&missing)).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Malformed { var: "CLICKHOUSE_CA_CERT", reason }
                if reason.contains("/nonexistent/ca.pem")),
            "{err}"
        );
        let dir = std::env::temp_dir().join(format!("meterline-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let path = empty.to_str().unwrap();
        let no_certificate = [
            ("CLICKHOUSE_URL", "https://h:8443"),
            ("CLICKHOUSE_CA_CERT", path),
        ];
        let err = ClickhouseSettings::from_env(&Env::new(&no_certificate)).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Malformed { var: "CLICKHOUSE_CA_CERT", reason }
                if reason.contains("no certificate")),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cluster_is_read_with_its_engine_and_nodes() {
        let single = [("CLICKHOUSE_URL", "http://h:8123")];
        assert_eq!(
            ClickhouseSettings::from_env(&Env::new(&single))
                .unwrap()
                .cluster,
            None
        );
        let replicated = [
            ("CLICKHOUSE_URL", "http://h:8123"),
            ("CLICKHOUSE_CLUSTER", "main"),
        ];
        assert_eq!(
            ClickhouseSettings::from_env(&Env::new(&replicated))
                .unwrap()
                .cluster,
            Some(ClickhouseCluster {
                name: "main".into(),
                engine: ClusterEngine::Replicated
            })
        );
        let plain = [
            ("CLICKHOUSE_URL", "http://h:8123"),
            ("CLICKHOUSE_CLUSTER", "main"),
            ("CLICKHOUSE_CLUSTER_ENGINE", "plain"),
            ("CLICKHOUSE_CLUSTER_NODES", "http://a:8123, http://b:8123"),
        ];
        assert_eq!(
            ClickhouseSettings::from_env(&Env::new(&plain))
                .unwrap()
                .cluster,
            Some(ClickhouseCluster {
                name: "main".into(),
                engine: ClusterEngine::Plain {
                    nodes: vec!["http://a:8123".into(), "http://b:8123".into()]
                }
            })
        );
    }

    #[test]
    fn a_cluster_setting_that_cannot_work_is_named() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("CLICKHOUSE_CLUSTER_ENGINE", "plain")],
                "CLICKHOUSE_CLUSTER_ENGINE",
            ),
            (
                &[("CLICKHOUSE_CLUSTER_NODES", "http://a")],
                "CLICKHOUSE_CLUSTER_NODES",
            ),
            (&[("CLICKHOUSE_CLUSTER", "a b")], "CLICKHOUSE_CLUSTER"),
            (
                &[
                    ("CLICKHOUSE_CLUSTER", "c"),
                    ("CLICKHOUSE_CLUSTER_ENGINE", "sharded"),
                ],
                "CLICKHOUSE_CLUSTER_ENGINE",
            ),
            (
                &[
                    ("CLICKHOUSE_CLUSTER", "c"),
                    ("CLICKHOUSE_CLUSTER_ENGINE", "plain"),
                ],
                "CLICKHOUSE_CLUSTER_NODES",
            ),
            (
                &[
                    ("CLICKHOUSE_CLUSTER", "c"),
                    ("CLICKHOUSE_CLUSTER_NODES", "http://a"),
                ],
                "CLICKHOUSE_CLUSTER_NODES",
            ),
            (
                &[
                    ("CLICKHOUSE_CLUSTER", "c"),
                    ("CLICKHOUSE_CLUSTER_ENGINE", "plain"),
                    ("CLICKHOUSE_CLUSTER_NODES", "http://a,b:8123"),
                ],
                "CLICKHOUSE_CLUSTER_NODES",
            ),
        ];
        for (vars, named) in cases {
            let mut all: Vec<(&str, &str)> = vec![("CLICKHOUSE_URL", "http://h:8123")];
            all.extend_from_slice(vars);
            let err = ClickhouseSettings::from_env(&Env::new(&Vars(&all))).unwrap_err();
            assert!(err.to_string().contains(named), "{vars:?}: {err}");
        }
    }

    #[test]
    fn the_clickhouse_password_never_shows_in_debug() {
        let src = [
            ("CLICKHOUSE_URL", "http://h:8123"),
            ("CLICKHOUSE_PASSWORD", "s3cret-pw"),
        ];
        let shown = format!(
            "{:?}",
            ClickhouseSettings::from_env(&Env::new(&src)).unwrap()
        );
        assert!(
            !shown.contains("s3cret-pw") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn missing_variable_is_named() {
        let src: [(&str, &str); 0] = [];
        let err = KafkaSettings::from_env(&Env::new(&src)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: KAFKA_BROKERS is required but not set"
        );
    }

    #[test]
    fn empty_value_counts_as_missing() {
        let src = [("KAFKA_BROKERS", " ")];
        assert_eq!(
            KafkaSettings::from_env(&Env::new(&src)).unwrap_err(),
            ConfigError::Missing {
                var: "KAFKA_BROKERS"
            }
        );
    }

    #[test]
    fn malformed_values_are_named() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("KAFKA_BROKERS", "localhost")], "KAFKA_BROKERS"),
            (
                &[("KAFKA_BROKERS", "a:1"), ("TOPIC_PREFIX", "a b")],
                "TOPIC_PREFIX",
            ),
        ];
        for (vars, name) in cases {
            let err = KafkaSettings::from_env(&Env::new(&Vars(vars))).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn database_url_is_never_echoed() {
        let src = [("DATABASE_URL", "mysql://user:hunter2@host/db")];
        let err = PostgresSettings::from_env(&Env::new(&src)).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
        let ok = PostgresSettings {
            url: "postgres://u:hunter2@h/d".into(),
        };
        assert!(!format!("{ok:?}").contains("hunter2"));
    }

    #[test]
    fn ranges_and_bools() {
        let src = [("N", "0"), ("B", "maybe"), ("C", "yes")];
        let env = Env::new(&src);
        assert!(env.u64_in_range("N", 5, 1..=60).is_err());
        assert_eq!(env.u64_in_range("M", 5, 1..=60), Ok(5));
        assert!(env.bool_or("B", false).is_err());
        assert_eq!(env.bool_or("C", false), Ok(true));
    }

    #[test]
    fn identifiers() {
        assert!(is_identifier("meterline_t1"));
        assert!(!is_identifier("1abc"));
        assert!(!is_identifier("a;drop"));
        assert!(!is_identifier(""));
    }
}
