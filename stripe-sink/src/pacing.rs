//! Pacing of Stripe calls, per Stripe account: a token bucket (`governor`) at the account's
//! rate, a circuit breaker, and the backoff between retries. Three separate values, each
//! tested on its own.
//!
//! Rules kept here:
//! - Pacing is per Stripe *account* (`acct_...`, asked of Stripe once per key), not per key:
//!   Stripe's limits are the account's, and two keys of one account share them.
//! - The bucket holds one token (no bursts) and refills 5% slower than the rate, so in any
//!   one-second window an account sees at most its configured number of requests: Stripe's
//!   limit is per second, and a burst after an idle period would cross it.
//! - The breaker opens after consecutive failures of the account (5xx, timeouts,
//!   authentication errors; not 429s, which only slow down) and stays open for a cool-down;
//!   then one request probes, and its outcome closes or re-opens it. While open, no request
//!   reaches Stripe.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use meterline_accounts::stripe_config::{StripeApiKey, SyncConfig};
use meterline_schemas::{EnvironmentId, TenantId};
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::stripe::{ErrorClass, StripeClient, StripeError};

/// Stripe's documented meter event rates: test mode shares the basic 25 writes/s, live mode
/// has 1000 meter events/s.
pub fn default_rate(livemode: bool) -> u32 {
    if livemode {
        1000
    } else {
        25
    }
}

/// Exponential backoff with full jitter: attempt n waits a random time in
/// `[0, min(max, base * 2^n)]`, never less than Stripe's `Retry-After` when it sent one.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn delay(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max);
        let jittered = Duration::from_secs_f64(rng.gen_range(0.0..=ceiling.as_secs_f64()));
        jittered.max(retry_after.unwrap_or_default())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// A circuit breaker over consecutive failures.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cool_down: Duration,
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            threshold,
            cool_down,
            failures: 0,
            open_until: None,
            probing: false,
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// May a request go out now? In half-open state, only one (the probe) at a time.
    /// `Err(wait)` says how long until it may.
    pub fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        match self.state(now) {
            BreakerState::Closed => Ok(()),
            BreakerState::Open => Err(self.open_until.map(|u| u - now).unwrap_or_default()),
            BreakerState::HalfOpen if self.probing => Err(Duration::from_secs(1)),
            BreakerState::HalfOpen => {
                self.probing = true;
                Ok(())
            }
        }
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.probing = false;
    }

    pub fn failure(&mut self, now: Instant) {
        self.failures += 1;
        if self.probing || self.failures >= self.threshold {
            self.open_until = Some(now + self.cool_down);
            self.probing = false;
        }
    }
}

/// One Stripe account's bucket and breaker.
pub struct Account {
    pub rate: u32,
    limiter: DefaultDirectRateLimiter,
    pub breaker: Mutex<Breaker>,
}

impl Account {
    fn new(rate: u32) -> Self {
        // One token every 1/rate seconds would let rate + 1 requests into a one-second window
        // that starts exactly at a token; 5% slower keeps every window at or under the rate,
        // with room for the limiter clock (calibrated TSC) running a little fast in a VM.
        let period = Duration::from_secs_f64(1.05 / f64::from(rate.max(1)));
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::MIN);
        Self {
            rate,
            limiter: RateLimiter::direct(quota),
            // Ten failures in a row: an outage, not the odd 500 Stripe documents as normal.
            breaker: Mutex::new(Breaker::new(10, Duration::from_secs(15))),
        }
    }

    /// Waits for the account's next token.
    pub async fn until_ready(&self) {
        self.limiter.until_ready().await;
    }

    /// May a request go out now? `Err(wait)` while the breaker is open (or probing).
    pub fn admit(&self) -> Result<(), Duration> {
        self.breaker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now())
    }

    /// Tells the breaker how a request went: `None` when Stripe accepted it, else the class
    /// of its failure. A refusal or a 429 means Stripe answered (429s only slow down), so it
    /// counts as a success (it also ends a half-open probe); our own earlier request still
    /// running (409) is no sign either way; anything else is a failure.
    pub fn record(&self, failure: Option<ErrorClass>) {
        let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        match failure {
            None | Some(ErrorClass::Permanent | ErrorClass::RateLimited) => breaker.success(),
            Some(ErrorClass::InProgress) => {}
            Some(ErrorClass::Retriable | ErrorClass::Authentication) => {
                breaker.failure(Instant::now())
            }
        }
    }
}

/// Every Stripe account the sink has talked to, keyed by its id (`acct_...`): Stripe's limits
/// are the account's, so every key of one account (a secret and a restricted key, a rolled
/// key, two tenant environments configured with keys of one account) shares one bucket and
/// one breaker. Which account a key belongs to is asked once per key per process
/// ([`paced_account`]).
#[derive(Default)]
pub struct Pacer {
    inner: Mutex<PacerInner>,
}

#[derive(Default)]
struct PacerInner {
    /// By account id.
    accounts: HashMap<String, Shared>,
    /// A key's fingerprint ([`key_fingerprint`]) → its account id.
    owners: HashMap<String, String>,
    /// A configuration scope (tenant/environment) → the account it was last paced under.
    scopes: HashMap<String, String>,
}

/// An account's pacing and the rate each configuration scope asked of it.
struct Shared {
    account: Arc<Account>,
    rates: HashMap<String, u32>,
}

/// A hash of an API key: what the pacer remembers a key by, so that the key itself is kept
/// nowhere but in its encrypted row.
pub fn key_fingerprint(key: &StripeApiKey) -> String {
    hex::encode(&Sha256::digest(key.expose().as_bytes())[..8])
}

impl Pacer {
    /// The account a key was found to belong to, if it was asked already.
    pub fn owner_of(&self, key: &StripeApiKey) -> Option<String> {
        self.lock().owners.get(&key_fingerprint(key)).cloned()
    }

    /// Remembers the account of a key (from `GET /v1/account`).
    pub fn learn_owner(&self, key: &StripeApiKey, account_id: &str) {
        self.lock()
            .owners
            .insert(key_fingerprint(key), account_id.to_owned());
    }

    /// The pacing of `account_id` for the configuration `scope`, which asks for `rate`
    /// requests per second. Scopes sharing an account share its bucket at the lowest rate
    /// any of them asks for (each tenant's limit holds; their sum never exceeds Stripe's);
    /// the bucket is re-created when that rate changes.
    pub fn account(&self, account_id: &str, scope: &str, rate: u32) -> Arc<Account> {
        let mut inner = self.lock();
        // A scope that moved to another account (a new key) no longer holds the old one's
        // rate down.
        if let Some(before) = inner.scopes.insert(scope.to_owned(), account_id.to_owned()) {
            if before != account_id {
                if let Some(old) = inner.accounts.get_mut(&before) {
                    old.rates.remove(scope);
                }
            }
        }
        let shared = inner
            .accounts
            .entry(account_id.to_owned())
            .or_insert_with(|| Shared {
                account: Arc::new(Account::new(rate)),
                rates: HashMap::new(),
            });
        shared.rates.insert(scope.to_owned(), rate);
        let lowest = shared.rates.values().copied().min().unwrap_or(rate);
        if shared.account.rate != lowest {
            shared.account = Arc::new(Account::new(lowest));
        }
        shared.account.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PacerInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (account, breaker state) of every account, for the status endpoint and metrics.
    pub fn breaker_states(&self) -> Vec<(String, BreakerState)> {
        let now = Instant::now();
        self.lock()
            .accounts
            .iter()
            .map(|(id, shared)| {
                let state = shared
                    .account
                    .breaker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .state(now);
                (id.clone(), state)
            })
            .collect()
    }
}

/// The pacing for requests with the configuration of `(tenant, environment)`: its key's
/// Stripe account's ([`Pacer::account`]) at the configured rate or Stripe's default, the
/// account asked of Stripe (`GET /v1/account`) the first time the key is seen. Nothing is
/// sent with a key before its account is known: pacing it alone could exceed the limit
/// its account shares with other keys.
pub async fn paced_account(
    pacer: &Pacer,
    stripe: &StripeClient,
    config: &SyncConfig,
    tenant: &TenantId,
    environment: &EnvironmentId,
) -> Result<Arc<Account>, StripeError> {
    let key = &config.api_key;
    let account_id = match pacer.owner_of(key) {
        Some(known) => known,
        None => {
            let asked = stripe.account_id(key).await?;
            pacer.learn_owner(key, &asked);
            asked
        }
    };
    let rate = config
        .rate_limit_per_second
        .unwrap_or_else(|| default_rate(key.livemode()));
    Ok(pacer.account(&account_id, &format!("{tenant}/{environment}"), rate))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn backoff_grows_to_its_ceiling_and_honours_retry_after() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(10),
        };
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..30 {
            let ceiling = Duration::from_millis(100)
                .saturating_mul(1 << attempt.min(20))
                .min(Duration::from_secs(10));
            let d = b.delay(attempt, None, &mut rng);
            assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
        }
        let d = b.delay(0, Some(Duration::from_secs(3)), &mut rng);
        assert!(d >= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_probes_and_closes() {
        let mut b = Breaker::new(3, Duration::from_secs(30));
        let t0 = Instant::now();
        for _ in 0..2 {
            b.failure(t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.failure(t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(b.admit(t0).is_err());
        tokio::time::advance(Duration::from_secs(31)).await;
        let t1 = Instant::now();
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert!(b.admit(t1).is_ok(), "one probe");
        assert!(b.admit(t1).is_err(), "only one probe at a time");
        b.failure(t1);
        assert_eq!(b.state(t1), BreakerState::Open, "a failed probe re-opens");
        tokio::time::advance(Duration::from_secs(31)).await;
        let t2 = Instant::now();
        assert!(b.admit(t2).is_ok());
        b.success();
        assert_eq!(b.state(t2), BreakerState::Closed);
    }

    #[tokio::test]
    async fn the_bucket_paces_without_bursts() {
        // governor keeps its own clock, so this runs in real time (two seconds): a lower
        // bound, which a slow machine cannot break.
        let account = Account::new(25);
        let start = std::time::Instant::now();
        for _ in 0..50 {
            account.until_ready().await;
        }
        // 50 tokens at 25/s with no burst: the 50th comes 49 intervals of 40 ms after the first.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1900), "{took:?}");
    }

    #[tokio::test]
    async fn accounts_open_on_outages_not_on_answers() {
        let account = Account::new(10);
        for _ in 0..20 {
            account.record(Some(ErrorClass::RateLimited));
            account.record(Some(ErrorClass::Permanent));
            account.record(Some(ErrorClass::InProgress));
        }
        assert!(account.admit().is_ok(), "429s and refusals are answers");
        for _ in 0..9 {
            account.record(Some(ErrorClass::Retriable));
        }
        account.record(None);
        account.record(Some(ErrorClass::Authentication));
        assert!(account.admit().is_ok(), "a success resets the count");
        for _ in 0..10 {
            account.record(Some(ErrorClass::Retriable));
        }
        assert!(account.admit().is_err(), "ten failures in a row open it");
    }

    #[test]
    fn scopes_sharing_an_account_share_one_bucket_at_the_lowest_rate() {
        let pacer = Pacer::default();
        let a = pacer.account("acct_1", "tenant_a/env_prod", 20);
        assert_eq!(a.rate, 20);
        let b = pacer.account("acct_1", "tenant_b/env_prod", 5);
        assert_eq!(b.rate, 5, "the lower rate holds for both");
        assert!(Arc::ptr_eq(
            &b,
            &pacer.account("acct_1", "tenant_a/env_prod", 20)
        ));
        // tenant_b moves to a key of another account: acct_1 is tenant_a's alone again.
        assert_eq!(pacer.account("acct_2", "tenant_b/env_prod", 5).rate, 5);
        assert_eq!(pacer.account("acct_1", "tenant_a/env_prod", 20).rate, 20);
        assert_eq!(pacer.breaker_states().len(), 2, "one breaker per account");
    }
}
