//! Events and their asynchronous delivery to webhook endpoints. Owns the event shapes (v1
//! snapshot events such as `customer.created`; v2 thin events such as
//! `v1.billing.meter.error_report_triggered`) and the delivery loop: one background task per
//! (event, endpoint), signed like Stripe (see `signature`), retried with doubling backoff on
//! anything but a 2xx, optionally duplicated or shuffled (`/_standin/webhooks/chaos`) because
//! Stripe's delivery is at-least-once and unordered.
//!
//! The `t=` in the signature is the real wall clock, not the stand-in's movable clock: receivers
//! check it against their own clock (300 s tolerance), and a test that moves the stand-in 24 h
//! ahead must still get verifiable webhooks. Secret-roll expiry uses the stand-in's clock.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::rules::rfc3339;
use crate::signature;
use crate::state::{Inner, Standin, WebhookAttempt};

/// Stripe's API version our snapshot events claim to be rendered with.
pub const API_VERSION: &str = "2025-04-30.basil";

/// One event to send to one endpoint.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub account_key: String,
    pub endpoint_id: String,
    pub url: String,
    pub event_id: String,
    pub event_type: String,
    pub body: Arc<Vec<u8>>,
}

/// Creates a v1 snapshot event (`data.object` is the object) and queues its deliveries.
pub fn publish_snapshot(
    app: &Standin,
    inner: &mut Inner,
    key: &str,
    event_type: &str,
    object: Value,
    previous_attributes: Option<Value>,
) {
    let id = inner.id("evt");
    let now = inner.now();
    let Some(account) = inner.accounts.get_mut(key) else {
        return;
    };
    let mut data = json!({ "object": object });
    if let Some(previous) = previous_attributes {
        data["previous_attributes"] = previous;
    }
    let endpoints: Vec<_> = account
        .webhook_endpoints
        .iter()
        .filter(|e| e.wants(event_type, false))
        .map(|e| (e.id.clone(), e.url.clone()))
        .collect();
    let event = json!({
        "id": id,
        "object": "event",
        "api_version": API_VERSION,
        "created": now,
        "data": data,
        "livemode": account.livemode,
        "pending_webhooks": endpoints.len(),
        "request": { "id": null, "idempotency_key": null },
        "type": event_type
    });
    account.events.push(event.clone());
    queue(app, inner, key, &id, event_type, &event, endpoints);
}

/// Creates a v2 thin event: the delivered body names the event and its related object only;
/// the details (`data`) are fetched with `GET /v2/core/events/{id}`, as with Stripe.
pub fn publish_thin(
    app: &Standin,
    inner: &mut Inner,
    key: &str,
    event_type: &str,
    related_object: Option<Value>,
    data: Value,
) {
    let id = inner.id("evt_test");
    let now = inner.now();
    let Some(account) = inner.accounts.get_mut(key) else {
        return;
    };
    let mut thin = json!({
        "id": id,
        "object": "v2.core.event",
        "type": event_type,
        "created": rfc3339(now),
        "livemode": account.livemode,
        "context": null,
        "reason": null
    });
    if let Some(related) = related_object {
        thin["related_object"] = related;
    }
    let mut full = thin.clone();
    full["data"] = data;
    account.thin_events.push(full);
    let endpoints: Vec<_> = account
        .webhook_endpoints
        .iter()
        .filter(|e| e.wants(event_type, true))
        .map(|e| (e.id.clone(), e.url.clone()))
        .collect();
    queue(app, inner, key, &id, event_type, &thin, endpoints);
}

fn queue(
    app: &Standin,
    inner: &mut Inner,
    key: &str,
    event_id: &str,
    event_type: &str,
    event: &Value,
    endpoints: Vec<(String, String)>,
) {
    let body = Arc::new(event.to_string().into_bytes());
    let copies = if inner.chaos.duplicate { 2 } else { 1 };
    for (endpoint_id, url) in endpoints {
        for _ in 0..copies {
            let delivery = Delivery {
                account_key: key.to_string(),
                endpoint_id: endpoint_id.clone(),
                url: url.clone(),
                event_id: event_id.to_string(),
                event_type: event_type.to_string(),
                body: body.clone(),
            };
            // The receiver only goes away when the server shuts down; then nobody waits for it.
            let _ = app.deliveries.send(delivery);
        }
    }
}

/// Runs until the stand-in is dropped: spawns one delivery task per queued delivery.
pub async fn dispatcher(app: Weak<Standin>, mut rx: mpsc::UnboundedReceiver<Delivery>) {
    // Plain HTTP only (endpoints in tests are local); a bounded timeout so a hung receiver
    // counts as a failed attempt instead of blocking its retries forever.
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook client could not be built; no webhooks will be sent");
            return;
        }
    };
    while let Some(delivery) = rx.recv().await {
        let Some(strong) = app.upgrade() else { return };
        let shuffle_ms = {
            let mut inner = strong.lock();
            let max = inner.chaos.shuffle_ms;
            if max == 0 {
                0
            } else {
                inner.rng.next_u64() % (max + 1)
            }
        };
        let (backoff_ms, max_attempts) = (
            strong.config.webhook_backoff_ms,
            strong.config.webhook_max_attempts,
        );
        drop(strong);
        tokio::spawn(deliver(
            app.clone(),
            client.clone(),
            delivery,
            Duration::from_millis(shuffle_ms),
            backoff_ms,
            max_attempts,
        ));
    }
}

async fn deliver(
    app: Weak<Standin>,
    client: reqwest::Client,
    delivery: Delivery,
    initial_delay: Duration,
    backoff_ms: u64,
    max_attempts: u32,
) {
    if !initial_delay.is_zero() {
        tokio::time::sleep(initial_delay).await;
    }
    for attempt in 1..=max_attempts {
        let secrets = {
            let Some(app) = app.upgrade() else { return };
            let inner = app.lock();
            let now = inner.now();
            inner
                .accounts
                .get(&delivery.account_key)
                .and_then(|a| {
                    a.webhook_endpoints
                        .iter()
                        .find(|e| e.id == delivery.endpoint_id)
                })
                .map(|e| e.signing_secrets(now))
        };
        // The endpoint was removed: nothing to deliver to.
        let Some(secrets) = secrets else { return };
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let header = match signature::header(t, &refs, &delivery.body) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, endpoint = %delivery.endpoint_id, "cannot sign webhook");
                return;
            }
        };
        let result = client
            .post(&delivery.url)
            .header("content-type", "application/json; charset=utf-8")
            .header(
                "user-agent",
                "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            )
            .header("stripe-signature", &header)
            .body(delivery.body.to_vec())
            .send()
            .await;
        let status = result.as_ref().ok().map(|r| r.status().as_u16());
        tracing::info!(
            endpoint = %delivery.endpoint_id,
            event_id = %delivery.event_id,
            event_type = %delivery.event_type,
            attempt,
            status = status.unwrap_or(0),
            "webhook attempt"
        );
        if let Some(app) = app.upgrade() {
            let mut inner = app.lock();
            if let Some(account) = inner.accounts.get_mut(&delivery.account_key) {
                account.webhook_attempts.push(WebhookAttempt {
                    endpoint: delivery.endpoint_id.clone(),
                    event_id: delivery.event_id.clone(),
                    event_type: delivery.event_type.clone(),
                    attempt,
                    status,
                    signature: header.clone(),
                });
            }
        }
        if status.is_some_and(|s| (200..300).contains(&s)) {
            return;
        }
        // Doubling backoff, capped so a long test run does not wait minutes between tries.
        let exp = backoff_ms.saturating_mul(1u64 << (attempt - 1).min(16));
        tokio::time::sleep(Duration::from_millis(exp.min(60_000))).await;
    }
    tracing::warn!(
        endpoint = %delivery.endpoint_id,
        event_id = %delivery.event_id,
        "webhook delivery gave up"
    );
}
