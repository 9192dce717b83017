//! All state of the stand-in, in one struct behind one `Mutex` (a test server: simple and
//! correct beats fast). Owns the movable clock every time rule reads, the seeded random
//! generator behind fault injection, the accounts (each with its own customers, meters, events,
//! identifier window, idempotency keys, limiter and statistics) and the v2 session tokens.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::rules::{Formula, SecondWindow};
use crate::webhooks::Delivery;

pub type App = Arc<Standin>;

pub struct Standin {
    inner: Mutex<Inner>,
    pub config: Config,
    /// Webhook deliveries go to the background dispatcher through this channel.
    pub deliveries: mpsc::UnboundedSender<Delivery>,
}

impl Standin {
    pub fn new(config: Config, deliveries: mpsc::UnboundedSender<Delivery>) -> Self {
        let mut inner = Inner {
            clock_offset_ms: 0,
            accounts: HashMap::new(),
            api_keys: HashMap::new(),
            expired_keys: HashSet::new(),
            faults: Faults::default(),
            faults_injected: FaultCounts::default(),
            rng: Rng::new(config.seed),
            sessions: HashMap::new(),
            chaos: WebhookChaos::default(),
            next_id: 0,
        };
        for key in &config.accounts {
            inner.add_account(key, None, None, config.rate_limit);
        }
        Standin {
            inner: Mutex::new(inner),
            config,
            deliveries,
        }
    }

    /// The state lock. A poisoned lock means a handler panicked mid-update: the state may be
    /// half-written, and a test server must not go on answering from it.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("stand-in state lock poisoned")
    }

    /// The lock, or None when poisoned: for `Drop` impls, which must not panic.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, Inner>> {
        self.inner.lock().ok()
    }
}

pub struct Inner {
    /// Added to the system clock; moved forward by tests (`/_standin/clock/advance`).
    pub clock_offset_ms: i64,
    /// By the secret key each account was created with (its handle, which stays when the
    /// key is rolled: tests inspect an account by it).
    pub accounts: HashMap<String, Account>,
    /// Every secret key that works now → its account's handle.
    pub api_keys: HashMap<String, String>,
    /// Keys rolled away: 401 `api_key_expired`, as Stripe answers an expired key.
    pub expired_keys: HashSet<String>,
    pub faults: Faults,
    /// How many faults were actually applied since the start, by kind.
    pub faults_injected: FaultCounts,
    pub rng: Rng,
    /// v2 meter event session tokens.
    pub sessions: HashMap<String, Session>,
    pub chaos: WebhookChaos,
    next_id: u64,
}

/// The machine's clock, Unix ms: read where a request arrives, before any lock or task, so
/// that when it arrived is not when the stand-in got round to it.
pub fn system_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Inner {
    /// Now on the stand-in's clock, in milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.on_clock_ms(system_ms())
    }

    /// The stand-in's clock at the system time `system_ms` (from [`system_ms`]).
    pub fn on_clock_ms(&self, system_ms: i64) -> i64 {
        system_ms + self.clock_offset_ms
    }

    /// Now on the stand-in's clock, in Unix seconds: what every time rule compares against.
    pub fn now(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }

    /// A fresh object id with Stripe's prefix; a counter plus random tail keeps ids unique and
    /// ordered by creation within one run.
    pub fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        let tail = uuid::Uuid::new_v4().simple().to_string();
        format!("{prefix}_{:06}{}", self.next_id, &tail[..14])
    }

    pub fn add_account(
        &mut self,
        secret_key: &str,
        livemode: Option<bool>,
        rate_limit: Option<u32>,
        default_rate_limit: u32,
    ) -> &mut Account {
        let livemode = livemode.unwrap_or_else(|| is_live_key(secret_key));
        let id = self.id("acct");
        let handle = self
            .api_keys
            .entry(secret_key.to_string())
            .or_insert_with(|| secret_key.to_string())
            .clone();
        self.expired_keys.remove(secret_key);
        let account = self
            .accounts
            .entry(handle)
            .or_insert_with(|| Account::new(id, secret_key.to_string(), livemode));
        account.livemode = livemode;
        account.rate_limit = rate_limit.unwrap_or(default_rate_limit);
        account
    }

    /// The account of `key`: a key that works now, or the key it was created with (rolled
    /// or not).
    pub fn account_of(&self, key: &str) -> Option<&Account> {
        self.api_keys
            .get(key)
            .and_then(|handle| self.accounts.get(handle))
            .or_else(|| self.accounts.get(key))
    }

    /// Rolls the account's secret key, as the Dashboard's "roll key" with expiry "now": the
    /// old key answers 401 `api_key_expired` from now on, `new_key` works for the same
    /// account (its customers, meters, events, identifiers and idempotency keys). `None`
    /// when `old_key` works for no account.
    pub fn roll_key(&mut self, old_key: &str, new_key: &str) -> Option<&Account> {
        let handle = self.api_keys.remove(old_key)?;
        self.expired_keys.insert(old_key.to_string());
        self.api_keys.insert(new_key.to_string(), handle.clone());
        let account = self.accounts.get_mut(&handle)?;
        account.secret_key = new_key.to_string();
        Some(account)
    }

    /// The account owning a webhook endpoint id, with the endpoint.
    pub fn endpoint_mut(&mut self, endpoint_id: &str) -> Option<&mut WebhookEndpoint> {
        self.accounts
            .values_mut()
            .flat_map(|a| a.webhook_endpoints.iter_mut())
            .find(|e| e.id == endpoint_id)
    }
}

pub fn is_live_key(key: &str) -> bool {
    key.starts_with("sk_live_") || key.starts_with("rk_live_")
}

pub struct Account {
    pub id: String,
    pub secret_key: String,
    pub livemode: bool,
    /// Requests per second, for reads and writes each.
    pub rate_limit: u32,
    pub reads: SecondWindow,
    pub writes: SecondWindow,
    /// Live mode only: v1 meter events, limited separately from the basic limit.
    pub live_meter_events: SecondWindow,
    /// Creation order; lists answer newest first, as Stripe does.
    pub customers: Vec<Customer>,
    pub webhook_endpoints: Vec<WebhookEndpoint>,
    pub meters: Vec<Meter>,
    /// Every meter event received and not refused synchronously, in order of receipt.
    pub meter_events: Vec<MeterEvent>,
    /// Identifier → time of first receipt (stand-in clock), for the 24 h uniqueness window.
    pub identifiers: HashMap<String, i64>,
    pub idempotency: HashMap<String, IdempotencyEntry>,
    /// (customer, event_name) pairs with a v1 meter event request in flight.
    pub meter_slots: HashSet<(String, String)>,
    pub stats: Stats,
    /// v2 thin events (error reports), fetchable at `GET /v2/core/events/{id}`.
    pub thin_events: Vec<Value>,
    /// v1 snapshot events, in creation order.
    pub events: Vec<Value>,
    /// Subscriptions (as Stripe's objects), made through test control.
    pub subscriptions: Vec<Value>,
    pub webhook_attempts: Vec<WebhookAttempt>,
    next_seq: u64,
}

impl Account {
    fn new(id: String, secret_key: String, livemode: bool) -> Self {
        Account {
            id,
            secret_key,
            livemode,
            rate_limit: 25,
            reads: SecondWindow::default(),
            writes: SecondWindow::default(),
            live_meter_events: SecondWindow::default(),
            customers: Vec::new(),
            webhook_endpoints: Vec::new(),
            meters: Vec::new(),
            meter_events: Vec::new(),
            identifiers: HashMap::new(),
            idempotency: HashMap::new(),
            meter_slots: HashSet::new(),
            stats: Stats::default(),
            thin_events: Vec::new(),
            events: Vec::new(),
            subscriptions: Vec::new(),
            webhook_attempts: Vec::new(),
            next_seq: 0,
        }
    }

    pub fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    pub fn customer(&self, id: &str) -> Option<&Customer> {
        self.customers.iter().find(|c| c.id == id && !c.deleted)
    }

    pub fn meter_by_event_name(&self, event_name: &str) -> Option<&Meter> {
        self.meters
            .iter()
            .find(|m| m.event_name == event_name && m.active)
    }
}

#[derive(Debug, Clone)]
pub struct Customer {
    pub id: String,
    pub created: i64,
    pub email: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub phone: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub deleted: bool,
}

impl Customer {
    pub fn to_json(&self, livemode: bool) -> Value {
        json!({
            "id": self.id,
            "object": "customer",
            "address": null,
            "balance": 0,
            "created": self.created,
            "currency": null,
            "default_source": null,
            "delinquent": false,
            "description": self.description,
            "discount": null,
            "email": self.email,
            "invoice_prefix": self.id.trim_start_matches("cus_").chars().take(8).collect::<String>().to_uppercase(),
            "invoice_settings": {
                "custom_fields": null,
                "default_payment_method": null,
                "footer": null,
                "rendering_options": null
            },
            "livemode": livemode,
            "metadata": self.metadata,
            "name": self.name,
            "next_invoice_sequence": 1,
            "phone": self.phone,
            "preferred_locales": [],
            "shipping": null,
            "tax_exempt": "none",
            "test_clock": null
        })
    }
}

#[derive(Debug, Clone)]
pub struct WebhookEndpoint {
    pub id: String,
    pub created: i64,
    pub url: String,
    pub enabled_events: Vec<String>,
    pub description: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub secret: String,
    /// The secret before the last roll and when it stops being sent (stand-in clock).
    pub previous_secret: Option<(String, i64)>,
}

impl WebhookEndpoint {
    /// Secrets to sign with now: the current one, then the rolled one while it is unexpired.
    pub fn signing_secrets(&self, now: i64) -> Vec<String> {
        let mut secrets = vec![self.secret.clone()];
        if let Some((old, expires_at)) = &self.previous_secret {
            if now < *expires_at {
                secrets.push(old.clone());
            }
        }
        secrets
    }

    /// `*` subscribes to every v1 snapshot event; thin v2 events (`v1.billing.meter.*`) must be
    /// listed by name, since Stripe sends them only to destinations that asked for them.
    pub fn wants(&self, event_type: &str, thin: bool) -> bool {
        self.enabled_events
            .iter()
            .any(|e| e == event_type || (!thin && e == "*"))
    }

    pub fn to_json(&self, livemode: bool, with_secret: bool) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "webhook_endpoint",
            "api_version": null,
            "application": null,
            "created": self.created,
            "description": self.description,
            "enabled_events": self.enabled_events,
            "livemode": livemode,
            "metadata": self.metadata,
            "status": "enabled",
            "url": self.url
        });
        // Stripe returns the secret only when the endpoint is created.
        if with_secret {
            v["secret"] = json!(self.secret);
        }
        v
    }
}

#[derive(Debug, Clone)]
pub struct Meter {
    pub id: String,
    pub created: i64,
    pub event_name: String,
    pub display_name: String,
    pub formula: Formula,
    pub customer_key: String,
    pub value_key: String,
    pub event_time_window: Option<String>,
    pub active: bool,
}

impl Meter {
    pub fn to_json(&self, livemode: bool) -> Value {
        json!({
            "id": self.id,
            "object": "billing.meter",
            "created": self.created,
            "customer_mapping": { "type": "by_id", "event_payload_key": self.customer_key },
            "default_aggregation": { "formula": self.formula.as_str() },
            "display_name": self.display_name,
            "event_name": self.event_name,
            "event_time_window": self.event_time_window,
            "livemode": livemode,
            "status": if self.active { "active" } else { "inactive" },
            "status_transitions": { "deactivated_at": null },
            "updated": self.created,
            "value_settings": { "event_payload_key": self.value_key }
        })
    }
}

/// A meter event as received. Only `counted` events enter summaries and totals: events whose
/// problems Stripe reports asynchronously (unknown customer or meter) are answered 200 but
/// never counted.
#[derive(Debug, Clone, Serialize)]
pub struct MeterEvent {
    pub seq: u64,
    pub event_name: String,
    pub identifier: String,
    pub customer: Option<String>,
    pub value: i64,
    pub timestamp: i64,
    pub received_at: i64,
    pub payload: Value,
    pub meter: Option<String>,
    pub counted: bool,
    pub cancelled: bool,
    /// `v1` or `v2`.
    pub api: &'static str,
    /// The asynchronous error code, when the event was not counted.
    pub error_code: Option<String>,
}

#[derive(Debug, Clone)]
pub struct IdempotencyEntry {
    /// Method, path and parameters of the first request under this key.
    pub fingerprint: String,
    pub created: i64,
    /// None while the first request is still running.
    pub response: Option<(u16, Value)>,
}

#[derive(Debug, Default)]
pub struct Stats {
    /// API requests per second of the stand-in clock (every authenticated request, refused or not).
    pub requests_per_second: BTreeMap<i64, u32>,
    /// When each v1 meter event request arrived (stand-in clock, ms, read as the handler
    /// started, before any lock or task; refused or not), for the most that arrived in any
    /// one-second span ([`crate::rules::busiest_second`]).
    pub meter_requests_ms: Vec<i64>,
    /// Per (customer, event_name): v1 meter event requests overlapping right now, and the most
    /// that ever overlapped (a sink that respects Stripe's rule keeps this at 1).
    pub concurrency: HashMap<(String, String), (u32, u32)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WebhookAttempt {
    pub endpoint: String,
    pub event_id: String,
    pub event_type: String,
    pub attempt: u32,
    /// HTTP status of the answer; None when the request itself failed.
    pub status: Option<u16>,
    pub signature: String,
}

pub struct Session {
    pub account_key: String,
    pub expires_at: i64,
}

/// Fault injection shares, drawn once per API request from the seeded generator.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Share of requests answered 429 before any work (not stored under an idempotency key).
    pub rate_429: f64,
    /// Share answered 500 without doing the work; stored and replayed under an idempotency key.
    pub rate_500: f64,
    /// Share delayed by `slow_ms` (meter events hold their (customer, meter) slot meanwhile).
    pub rate_slow: f64,
    pub slow_ms: u64,
    /// Share processed normally whose connection is then closed without an answer.
    pub rate_drop: f64,
    /// Only requests whose path starts with this are affected (all API requests when absent).
    pub path_prefix: Option<String>,
    /// Reseeds the generator when given.
    pub seed: Option<u64>,
}

/// Faults applied so far, by kind: a draw counts only when it changed the answer (a drawn
/// 429 after the account's own limiter refused, or a drawn 500 answered by an idempotent
/// replay, does not).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultCounts {
    pub too_many_requests: u64,
    pub server_error: u64,
    pub slow: u64,
    pub dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    TooManyRequests,
    ServerError,
    Slow(u64),
    Drop,
}

impl Faults {
    pub fn draw(&self, path: &str, rng: &mut Rng) -> Option<Fault> {
        if let Some(prefix) = &self.path_prefix {
            if !path.starts_with(prefix.as_str()) {
                return None;
            }
        }
        let total = self.rate_429 + self.rate_500 + self.rate_slow + self.rate_drop;
        if total <= 0.0 {
            return None;
        }
        let r = rng.next_f64();
        let mut edge = self.rate_429;
        if r < edge {
            return Some(Fault::TooManyRequests);
        }
        edge += self.rate_500;
        if r < edge {
            return Some(Fault::ServerError);
        }
        edge += self.rate_slow;
        if r < edge {
            return Some(Fault::Slow(self.slow_ms));
        }
        edge += self.rate_drop;
        if r < edge {
            return Some(Fault::Drop);
        }
        None
    }
}

/// Webhook delivery disorder, switched on by tests.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookChaos {
    /// Deliver every event twice.
    pub duplicate: bool,
    /// Delay each delivery by a random 0..shuffle_ms, so events arrive out of order.
    pub shuffle_ms: u64,
}

/// SplitMix64: tiny, seedable and good enough to draw fault shares reproducibly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_faults() {
        let faults = Faults {
            rate_429: 0.2,
            rate_500: 0.2,
            rate_slow: 0.2,
            slow_ms: 5,
            rate_drop: 0.2,
            ..Faults::default()
        };
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..50)
                .map(|_| faults.draw("/v1/x", &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let drawn = run(7);
        assert!(drawn.contains(&Some(Fault::TooManyRequests)));
        assert!(drawn.contains(&None));
    }

    #[test]
    fn path_prefix_limits_faults() {
        let faults = Faults {
            rate_500: 1.0,
            path_prefix: Some("/v1/billing".into()),
            ..Faults::default()
        };
        let mut rng = Rng::new(1);
        assert_eq!(faults.draw("/v1/customers", &mut rng), None);
        assert_eq!(
            faults.draw("/v1/billing/meter_events", &mut rng),
            Some(Fault::ServerError)
        );
    }

    #[test]
    fn rolled_secret_is_sent_until_it_expires() {
        let endpoint = WebhookEndpoint {
            id: "we_1".into(),
            created: 0,
            url: "http://x".into(),
            enabled_events: vec!["*".into()],
            description: None,
            metadata: BTreeMap::new(),
            secret: "new".into(),
            previous_secret: Some(("old".into(), 100)),
        };
        assert_eq!(endpoint.signing_secrets(99), ["new", "old"]);
        assert_eq!(endpoint.signing_secrets(100), ["new"]);
        assert!(endpoint.wants("customer.created", false));
        assert!(!endpoint.wants("v1.billing.meter.no_meter_found", true));
    }
}
