//! Configuration from the command line or the environment (`STANDIN_*`), and the defaults a
//! test gets from [`Config::for_tests`].

use std::net::SocketAddr;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "stripe-standin",
    about = "A local Stripe that behaves like Stripe"
)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "STANDIN_ADDR", default_value = "127.0.0.1:12111")]
    pub addr: SocketAddr,
    /// Secret keys of the accounts that exist at start, comma-separated
    /// (`sk_test_...` test mode, `sk_live_...` live mode).
    #[arg(long, env = "STANDIN_ACCOUNTS", value_delimiter = ',')]
    pub accounts: Vec<String>,
    /// Requests per second per account, for reads and for writes each (Stripe's test mode: 25).
    #[arg(long, env = "STANDIN_RATE_LIMIT", default_value_t = 25)]
    pub rate_limit: u32,
    /// First webhook retry delay in milliseconds; it doubles on every further failure.
    #[arg(long, env = "STANDIN_WEBHOOK_BACKOFF_MS", default_value_t = 1000)]
    pub webhook_backoff_ms: u64,
    /// Delivery attempts per webhook before giving up (Stripe keeps trying for 3 days).
    #[arg(long, env = "STANDIN_WEBHOOK_MAX_ATTEMPTS", default_value_t = 8)]
    pub webhook_max_attempts: u32,
    /// Seed of the fault-injection random generator (also settable at runtime).
    #[arg(long, env = "STANDIN_SEED", default_value_t = 1)]
    pub seed: u64,
}

impl Config {
    /// Port 0, one test-mode account `sk_test_standin`, fast webhook retries.
    pub fn for_tests() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            accounts: vec!["sk_test_standin".to_string()],
            rate_limit: 25,
            webhook_backoff_ms: 50,
            webhook_max_attempts: 5,
            seed: 1,
        }
    }
}
