//! Pacing of Stripe calls, per Stripe account and across every sink replica: send slots at
//! the account's rate, a circuit breaker, and the backoff between retries.
//!
//! Rules kept here:
//! - Pacing is per Stripe *account* (`acct_...`, asked of Stripe once per key), not per key:
//!   Stripe's limits are the account's, and two keys of one account share them.
//! - It is per account across replicas, not per process: every replica reserves its send
//!   slots from one row per account in PostgreSQL ([`shared`]), so N replicas together send
//!   at the account's rate, not N times it.
//! - Slots are further apart than the rate asks and never saved up ([`slots::interval`]), so
//!   in any one-second span an account sees at most its configured number of requests, even
//!   with requests leaving a little after their slots: Stripe's limit is per second, and a
//!   burst after an idle period would cross it.
//! - The breaker ([`breaker`]) opens after consecutive failures of the account (5xx,
//!   timeouts, authentication errors; not 429s, which only slow down) and stays open for a
//!   cool-down, for every replica; then one request of one replica probes, and its outcome
//!   closes or re-opens it. While open, no request reaches Stripe.

pub mod breaker;
pub mod shared;
pub mod slots;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meterline_accounts::stripe_config::{StripeApiKey, SyncConfig};
use meterline_schemas::{EnvironmentId, TenantId};
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::metrics;
use crate::stripe::{ErrorClass, StripeClient, StripeError};
pub use breaker::{Breaker, BreakerState};
use shared::{ProbeClaim, Reservation, SharedPacing};
use slots::Block;

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

/// One Stripe account as this replica paces it: slots reserved for every replica at once,
/// and the breaker every replica obeys.
pub struct Account {
    pub id: String,
    pub rate: u32,
    interval: Duration,
    shared: SharedPacing,
    /// The block of slots this replica holds. The lock also queues this replica's requests
    /// (tokio's mutex is fair: first come, first slot) and lets one of them reserve for all.
    slots: tokio::sync::Mutex<Option<Block>>,
    /// This replica's requests waiting for a slot: how many the next reservation asks for.
    waiting: AtomicU32,
    pub breaker: Mutex<Breaker>,
}

/// Counts a request among the waiting while it waits.
struct Waiting<'a>(&'a AtomicU32);

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicU32) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a request waits before asking again when the shared pacing cannot be read, or
/// another replica's probe is out.
const SHARED_RETRY: Duration = Duration::from_secs(1);

/// Why a request may not go to Stripe now, and how long until it is worth asking again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotReady {
    pub wait: Duration,
    pub why: &'static str,
    /// The `outcome` label of `stripe_sink_stripe_requests_total` it counts under.
    pub outcome: &'static str,
}

/// The shared pacing could not be read or written.
const UNSHARED: NotReady = NotReady {
    wait: SHARED_RETRY,
    why: "the stripe account's shared rate limit could not be read from postgres",
    outcome: "pacing_unavailable",
};

impl NotReady {
    fn open(wait: Duration) -> Self {
        Self {
            wait,
            why: "circuit open for this stripe account",
            outcome: "circuit_open",
        }
    }
}

impl Account {
    fn new(id: &str, rate: u32, shared: SharedPacing) -> Self {
        Self {
            id: id.to_owned(),
            rate,
            interval: slots::interval(rate),
            shared,
            slots: tokio::sync::Mutex::new(None),
            waiting: AtomicU32::new(0),
            // Ten failures in a row: an outage, not the odd 500 Stripe documents as normal.
            breaker: Mutex::new(Breaker::new(10, Duration::from_secs(15))),
        }
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until one request may go to Stripe: the breaker admits it and the account has a
    /// slot for it now. `Err` while the breaker is open (opened here or by another replica),
    /// another replica's probe is out, or the shared pacing cannot be read: nothing is sent
    /// then, since a replica pacing alone could exceed the account's rate.
    pub async fn ready(&self) -> Result<(), NotReady> {
        let _waiting = Waiting::enter(&self.waiting);
        loop {
            let probing = {
                let mut breaker = self.breaker();
                breaker.admit(Instant::now()).map_err(NotReady::open)?;
                breaker.probing()
            };
            if probing {
                // Nobody else sends while the breaker is open: the probe needs no slot.
                match self.shared.claim_probe(&self.id).await {
                    Ok(ProbeClaim::Mine) => return Ok(()),
                    Ok(ProbeClaim::Closed) => {
                        self.breaker().success();
                        continue;
                    }
                    Ok(ProbeClaim::Elsewhere) => {
                        self.breaker().end_probe();
                        return Err(NotReady::open(SHARED_RETRY));
                    }
                    Err(e) => {
                        self.breaker().end_probe();
                        tracing::warn!(account = %self.id, error = %e, "claiming the probe failed");
                        return Err(UNSHARED);
                    }
                }
            }
            let mut held = self.slots.lock().await;
            if let Some(at) = held.as_mut().and_then(|block| block.take(Instant::now())) {
                drop(held);
                tokio::time::sleep_until(at).await;
                // Woken too late (a busy machine), the slot could sit next to another
                // replica's: it is dropped and the request waits for the next one.
                if Instant::now() <= at + slots::LATE {
                    return Ok(());
                }
                metrics::pacing_slot_missed();
                continue;
            }
            let count = slots::block_size(self.waiting.load(Ordering::Relaxed), self.rate);
            match self.shared.reserve(&self.id, self.interval, count).await {
                Ok(Reservation::Slots { first_in }) => {
                    *held = Some(Block::new(Instant::now() + first_in, self.interval, count));
                }
                Ok(Reservation::Open { remaining }) => {
                    self.breaker().hold_open_until(Instant::now() + remaining);
                    return Err(NotReady::open(remaining));
                }
                // The cool-down is over: the breaker is half-open here too, and the next
                // round asks who probes.
                Ok(Reservation::Probe) => self.breaker().hold_open_until(Instant::now()),
                Err(e) => {
                    tracing::warn!(account = %self.id, error = %e, "reserving send slots failed");
                    return Err(UNSHARED);
                }
            }
        }
    }

    /// Tells the breaker how a request went ([`Breaker::record`]); opens or closes it for
    /// every replica when this request's outcome decided that.
    pub async fn record(&self, failure: Option<ErrorClass>) {
        let (was_probe, opened) = {
            let mut breaker = self.breaker();
            let was_probe = breaker.probing();
            (was_probe, breaker.record(failure, Instant::now()))
        };
        let shared = match (opened, was_probe, failure) {
            (Some(cool_down), _, _) => self.shared.open(&self.id, cool_down).await,
            (None, true, None | Some(ErrorClass::Permanent | ErrorClass::RateLimited)) => {
                self.shared.close(&self.id).await
            }
            (None, true, Some(ErrorClass::InProgress)) => self.shared.release_probe(&self.id).await,
            _ => Ok(()),
        };
        if let Err(e) = shared {
            tracing::warn!(account = %self.id, error = %e, "sharing the breaker's state failed");
        }
    }
}

/// Every Stripe account the sink has talked to, keyed by its id (`acct_...`): Stripe's limits
/// are the account's, so every key of one account (a secret and a restricted key, a rolled
/// key, two tenant environments configured with keys of one account) shares one rate limit
/// and one breaker, and so does every replica ([`shared`]). Which account a key belongs to
/// is asked once per key per process ([`paced_account`]).
pub struct Pacer {
    shared: SharedPacing,
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
    pub fn new(shared: SharedPacing) -> Self {
        Self {
            shared,
            inner: Mutex::default(),
        }
    }

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
    /// requests per second. Scopes sharing an account share its slots at the lowest rate
    /// any of them asks for (each tenant's limit holds; their sum never exceeds Stripe's);
    /// the account's pacing is re-created when that rate changes (its shared row stays).
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
        let paced = inner
            .accounts
            .entry(account_id.to_owned())
            .or_insert_with(|| Shared {
                account: Arc::new(Account::new(account_id, rate, self.shared.clone())),
                rates: HashMap::new(),
            });
        paced.rates.insert(scope.to_owned(), rate);
        let lowest = paced.rates.values().copied().min().unwrap_or(rate);
        if paced.account.rate != lowest {
            paced.account = Arc::new(Account::new(account_id, lowest, self.shared.clone()));
        }
        paced.account.clone()
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

    #[tokio::test]
    async fn scopes_sharing_an_account_share_one_pacing_at_the_lowest_rate() {
        // Never connected: choosing an account's pacing reads nothing shared.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://meterline@127.0.0.1:1/unused")
            .expect("a lazy pool");
        let pacer = Pacer::new(SharedPacing::new(pool));
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
