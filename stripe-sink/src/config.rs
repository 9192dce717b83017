//! Configuration of the stripe-sink service, read once at start.

use std::net::SocketAddr;

use meterline_common::config::{
    ConfigError, Env, KafkaSettings, PostgresSettings, ProcessEnv, Source,
};

#[derive(Debug, Clone)]
pub struct Config {
    /// `HTTP_ADDR` (default `0.0.0.0:8081`).
    pub http_addr: SocketAddr,
    pub kafka: KafkaSettings,
    pub postgres: PostgresSettings,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(&ProcessEnv)
    }

    pub fn from_source(source: &dyn Source) -> Result<Self, ConfigError> {
        let env = Env::new(source);
        Ok(Self {
            http_addr: env.socket_addr_or("HTTP_ADDR", "0.0.0.0:8081")?,
            kafka: KafkaSettings::from_env(&env)?,
            postgres: PostgresSettings::from_env(&env)?,
        })
    }
}
