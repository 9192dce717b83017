//! Test control under `/_standin/...` (a prefix no Stripe route uses), JSON in and out, no
//! authentication: the movable clock every time rule reads, fault injection, webhook disorder,
//! accounts created at runtime, API key and webhook secret rolls, and inspection of what was
//! received.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::Error;
use crate::state::{App, FaultCounts, Faults, Inner, WebhookChaos};

pub fn router() -> Router<App> {
    Router::new()
        .route(
            "/_standin/health",
            get(|| async { Json(json!({ "ok": true })) }),
        )
        .route("/_standin/clock", get(clock))
        .route("/_standin/clock/advance", post(advance_clock))
        .route("/_standin/clock/set", post(set_clock))
        .route("/_standin/faults", get(get_faults).post(set_faults))
        .route("/_standin/faults/injected", get(get_faults_injected))
        .route("/_standin/webhooks/chaos", get(get_chaos).post(set_chaos))
        .route("/_standin/accounts", post(upsert_account))
        .route("/_standin/accounts/{secret_key}/inspect", get(inspect))
        .route("/_standin/accounts/{secret_key}/roll_key", post(roll_key))
        .route(
            "/_standin/accounts/{secret_key}/restricted_keys",
            post(add_restricted_key),
        )
        .route(
            "/_standin/webhook_endpoints/{id}/roll_secret",
            post(roll_secret),
        )
        .route(
            "/_standin/accounts/{secret_key}/subscriptions",
            post(upsert_subscription),
        )
        .route(
            "/_standin/accounts/{secret_key}/subscriptions/{id}/finalize_invoice",
            post(finalize_invoice),
        )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvoicePeriod {
    /// The usage period the invoice bills (one period back, as Stripe's invoices say).
    period_start: i64,
    period_end: i64,
}

/// Finalizes an invoice of the subscription for the usage of `[period_start, period_end)`
/// and sends `invoice.finalized`, shaped as Stripe's (API version 2025-04-30: the
/// subscription under `parent.subscription_details`). Usage reported later for that period
/// is on no invoice.
async fn finalize_invoice(
    State(app): State<App>,
    Path((secret_key, id)): Path<(String, String)>,
    Json(body): Json<InvoicePeriod>,
) -> Result<Json<Value>, Error> {
    let mut inner = app.lock();
    let now = inner.now();
    let invoice_id = inner.id("in");
    let account = inner
        .accounts
        .get(&secret_key)
        .ok_or_else(|| Error::no_such("account", &secret_key, "secret_key"))?;
    let subscription = account
        .subscriptions
        .iter()
        .find(|s| s["id"] == id.as_str())
        .ok_or_else(|| Error::no_such("subscription", &id, "id"))?;
    let invoice = json!({
        "id": invoice_id,
        "object": "invoice",
        "customer": subscription["customer"],
        "status": "open",
        "billing_reason": "subscription_cycle",
        "parent": {
            "type": "subscription_details",
            "subscription_details": { "subscription": id }
        },
        "period_start": body.period_start,
        "period_end": body.period_end,
        "status_transitions": { "finalized_at": now },
        "livemode": account.livemode
    });
    crate::webhooks::publish_snapshot(
        &app,
        &mut inner,
        &secret_key,
        "invoice.finalized",
        invoice.clone(),
        None,
    );
    Ok(Json(invoice))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionBody {
    /// An existing subscription to change; a new one when absent.
    id: Option<String>,
    customer: String,
    /// The Stripe meter (`mtr_...`) its metered price bills.
    meter: Option<String>,
    current_period_start: i64,
    current_period_end: i64,
    /// Set to end the subscription then (`customer.subscription.deleted`).
    ended_at: Option<i64>,
}

/// Creates or changes a subscription with one metered item, shaped as Stripe's (API version
/// 2025-04-30: the period on the item), and sends `customer.subscription.created`,
/// `.updated` or, with `ended_at`, `.deleted`. A control route: the stand-in has no prices
/// and no clock that runs for a month, so a test names the period it wants Stripe to have.
async fn upsert_subscription(
    State(app): State<App>,
    Path(secret_key): Path<String>,
    Json(body): Json<SubscriptionBody>,
) -> Result<Json<Value>, Error> {
    let mut inner = app.lock();
    if body.current_period_end <= body.current_period_start {
        return Err(Error::bad_value(
            "current_period_end must be after current_period_start",
            "current_period_end",
        ));
    }
    let now = inner.now();
    let (id, item, price) = match &body.id {
        Some(id) => (id.clone(), inner.id("si"), inner.id("price")),
        None => (inner.id("sub"), inner.id("si"), inner.id("price")),
    };
    let account = inner
        .accounts
        .get_mut(&secret_key)
        .ok_or_else(|| Error::no_such("account", &secret_key, "secret_key"))?;
    if !account.customers.iter().any(|c| c.id == body.customer) {
        return Err(Error::no_such("customer", &body.customer, "customer"));
    }
    let existing = account
        .subscriptions
        .iter()
        .position(|s| s["id"] == id.as_str());
    if body.id.is_some() && existing.is_none() {
        return Err(Error::no_such("subscription", &id, "id"));
    }
    let subscription = json!({
        "id": id,
        "object": "subscription",
        "customer": body.customer,
        "status": if body.ended_at.is_some() { "canceled" } else { "active" },
        "billing_cycle_anchor": body.current_period_start,
        "created": now,
        "ended_at": body.ended_at,
        "livemode": account.livemode,
        "items": {
            "object": "list",
            "data": [{
                "id": item,
                "object": "subscription_item",
                "current_period_start": body.current_period_start,
                "current_period_end": body.current_period_end,
                "price": {
                    "id": price,
                    "object": "price",
                    "recurring": {
                        "interval": "month",
                        "interval_count": 1,
                        "meter": body.meter,
                        "usage_type": "metered"
                    }
                }
            }]
        }
    });
    let event_type = match (existing, body.ended_at) {
        (_, Some(_)) => "customer.subscription.deleted",
        (Some(_), None) => "customer.subscription.updated",
        (None, None) => "customer.subscription.created",
    };
    match existing {
        Some(i) => account.subscriptions[i] = subscription.clone(),
        None => account.subscriptions.push(subscription.clone()),
    }
    crate::webhooks::publish_snapshot(
        &app,
        &mut inner,
        &secret_key,
        event_type,
        subscription.clone(),
        None,
    );
    Ok(Json(subscription))
}

fn clock_json(inner: &Inner) -> Value {
    json!({
        "now": inner.now(),
        "now_ms": inner.now_ms(),
        "offset_ms": inner.clock_offset_ms
    })
}

async fn clock(State(app): State<App>) -> Json<Value> {
    Json(clock_json(&app.lock()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Advance {
    seconds: i64,
}

/// Moves the clock forward (or back, with a negative value) by `seconds`.
async fn advance_clock(State(app): State<App>, Json(body): Json<Advance>) -> Json<Value> {
    let mut inner = app.lock();
    inner.clock_offset_ms += body.seconds * 1000;
    Json(clock_json(&inner))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetClock {
    now: i64,
}

/// Sets the clock so that "now" is `now` (Unix seconds); it keeps ticking from there.
async fn set_clock(State(app): State<App>, Json(body): Json<SetClock>) -> Json<Value> {
    let mut inner = app.lock();
    let current = inner.now_ms() - inner.clock_offset_ms;
    inner.clock_offset_ms = body.now * 1000 - current;
    Json(clock_json(&inner))
}

async fn get_faults(State(app): State<App>) -> Json<Faults> {
    Json(app.lock().faults.clone())
}

/// Replaces the fault configuration (send `{}` to switch every fault off).
async fn set_faults(State(app): State<App>, Json(faults): Json<Faults>) -> Json<Faults> {
    let mut inner = app.lock();
    if let Some(seed) = faults.seed {
        inner.rng = crate::state::Rng::new(seed);
    }
    inner.faults = faults.clone();
    Json(faults)
}

/// How many faults were applied since the start, by kind (`too_many_requests`,
/// `server_error`, `slow`, `dropped`); reconfiguring the faults does not reset them.
async fn get_faults_injected(State(app): State<App>) -> Json<FaultCounts> {
    Json(app.lock().faults_injected.clone())
}

async fn get_chaos(State(app): State<App>) -> Json<WebhookChaos> {
    Json(app.lock().chaos.clone())
}

async fn set_chaos(State(app): State<App>, Json(chaos): Json<WebhookChaos>) -> Json<WebhookChaos> {
    app.lock().chaos = chaos.clone();
    Json(chaos)
}

const KEY_PREFIXES: [&str; 4] = ["sk_test_", "sk_live_", "rk_test_", "rk_live_"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    secret_key: String,
    livemode: Option<bool>,
    rate_limit: Option<u32>,
}

/// Creates the account, or updates `livemode` / `rate_limit` of an existing one (its data kept).
async fn upsert_account(
    State(app): State<App>,
    Json(body): Json<NewAccount>,
) -> Result<Json<Value>, Error> {
    if !KEY_PREFIXES.iter().any(|p| body.secret_key.starts_with(p)) {
        return Err(Error::bad_value(
            "secret_key must start with sk_test_, sk_live_, rk_test_ or rk_live_",
            "secret_key",
        ));
    }
    let default_limit = app.config.rate_limit;
    let mut inner = app.lock();
    let account = inner.add_account(
        &body.secret_key,
        body.livemode,
        body.rate_limit,
        default_limit,
    );
    Ok(Json(json!({
        "id": account.id,
        "secret_key": account.secret_key,
        "livemode": account.livemode,
        "rate_limit": account.rate_limit
    })))
}

/// Everything a test needs to check what a sink did: every meter event received (with
/// `counted`, `cancelled`, `error_code`), per-(customer, event_name) totals of counted events,
/// requests per second, the most overlapping meter event requests per (customer, event_name),
/// events created and webhook delivery attempts.
async fn inspect(
    State(app): State<App>,
    Path(secret_key): Path<String>,
) -> Result<Json<Value>, Error> {
    let inner = app.lock();
    let account = inner
        .account_of(&secret_key)
        .ok_or_else(|| Error::no_such("account", &secret_key, "secret_key"))?;
    let mut totals: std::collections::BTreeMap<(String, String), (i64, u64)> = Default::default();
    for e in account
        .meter_events
        .iter()
        .filter(|e| e.counted && !e.cancelled)
    {
        let key = (e.customer.clone().unwrap_or_default(), e.event_name.clone());
        let entry = totals.entry(key).or_default();
        entry.0 += e.value;
        entry.1 += 1;
    }
    let totals: Vec<Value> = totals
        .into_iter()
        .map(|((customer, event_name), (total, count))| {
            json!({ "customer": customer, "event_name": event_name, "total": total, "count": count })
        })
        .collect();
    let per_second: Vec<Value> = account
        .stats
        .requests_per_second
        .iter()
        .map(|(second, count)| json!({ "second": second, "count": count }))
        .collect();
    let mut concurrency: Vec<Value> = account
        .stats
        .concurrency
        .iter()
        .map(|((customer, event_name), (_, max))| {
            json!({ "customer": customer, "event_name": event_name, "max_concurrent": max })
        })
        .collect();
    concurrency.sort_by_key(|v| v.to_string());
    Ok(Json(json!({
        "account": {
            "id": account.id,
            "livemode": account.livemode,
            "rate_limit": account.rate_limit
        },
        "meter_events": account.meter_events,
        "totals": totals,
        "requests_per_second": per_second,
        "max_requests_per_second": account.stats.requests_per_second.values().max().copied().unwrap_or(0),
        "meter_request_times_ms": account.stats.meter_requests_ms,
        "meter_requests_in_busiest_second": crate::rules::busiest_second(&account.stats.meter_requests_ms),
        "concurrency": concurrency,
        "events": account.events,
        "thin_events": account.thin_events,
        "webhook_attempts": account.webhook_attempts
    })))
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Roll {
    /// How long the old secret keeps being sent (Stripe allows up to 24 h); default 24 h.
    expires_in_seconds: Option<i64>,
}

/// Rolls an endpoint's signing secret; until the old one expires (stand-in clock) every
/// delivery carries two v1 signatures, new secret first.
async fn roll_secret(
    State(app): State<App>,
    Path(id): Path<String>,
    body: Option<Json<Roll>>,
) -> Result<Json<Value>, Error> {
    let expires_in = body
        .and_then(|Json(r)| r.expires_in_seconds)
        .unwrap_or(24 * 3600);
    let mut inner = app.lock();
    let now = inner.now();
    let endpoint = inner
        .endpoint_mut(&id)
        .ok_or_else(|| Error::no_such("webhook endpoint", &id, "id"))?;
    let new_secret = format!("whsec_{}", uuid::Uuid::new_v4().simple());
    let old = std::mem::replace(&mut endpoint.secret, new_secret.clone());
    endpoint.previous_secret = Some((old.clone(), now + expires_in));
    Ok(Json(json!({
        "id": id,
        "secret": new_secret,
        "previous_secret": old,
        "previous_secret_expires_at": now + expires_in
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollKey {
    /// The key that replaces it; default a fresh one of the same kind.
    new_secret_key: Option<String>,
}

/// Rolls an account's secret key with immediate expiry: the old key answers 401
/// `api_key_expired`, the new one works for the same account and its data.
async fn roll_key(
    State(app): State<App>,
    Path(secret_key): Path<String>,
    body: Option<Json<RollKey>>,
) -> Result<Json<Value>, Error> {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let Some(prefix) = KEY_PREFIXES.iter().find(|p| secret_key.starts_with(**p)) else {
        return Err(Error::no_such("account", &secret_key, "secret_key"));
    };
    let new_key = body
        .new_secret_key
        .unwrap_or_else(|| format!("{prefix}{}", uuid::Uuid::new_v4().simple()));
    if !new_key.starts_with(prefix) {
        return Err(Error::bad_value(
            "new_secret_key must be of the same kind (prefix) as the key it replaces",
            "new_secret_key",
        ));
    }
    let mut inner = app.lock();
    if inner.api_keys.contains_key(&new_key) || inner.expired_keys.contains(&new_key) {
        return Err(Error::bad_value(
            "new_secret_key is already in use",
            "new_secret_key",
        ));
    }
    let account = inner
        .roll_key(&secret_key, &new_key)
        .ok_or_else(|| Error::no_such("account", &secret_key, "secret_key"))?;
    Ok(Json(json!({
        "id": account.id,
        "secret_key": new_key,
        "previous_secret_key": secret_key
    })))
}

/// Adds a restricted key (`rk_test_`/`rk_live_`, by the account's mode) to the account of a
/// working key: another key of the same account, with its data and its rate limit.
async fn add_restricted_key(
    State(app): State<App>,
    Path(secret_key): Path<String>,
) -> Result<Json<Value>, Error> {
    let mut inner = app.lock();
    let Some(handle) = inner.api_keys.get(&secret_key).cloned() else {
        return Err(Error::no_such("account", &secret_key, "secret_key"));
    };
    let account = inner
        .accounts
        .get(&handle)
        .ok_or_else(|| Error::no_such("account", &secret_key, "secret_key"))?;
    let mode = if account.livemode { "live" } else { "test" };
    let (id, key) = (
        account.id.clone(),
        format!("rk_{mode}_{}", uuid::Uuid::new_v4().simple()),
    );
    inner.api_keys.insert(key.clone(), handle);
    Ok(Json(json!({"id": id, "restricted_key": key})))
}
