//! `POST /v1/billing/meter_events` and `POST /v1/billing/meter_event_adjustments`, plus the
//! recording step the v2 stream shares.
//!
//! Synchronous refusals (400): bad parameters, a timestamp outside [now − 35 days, now + 5 min],
//! a value that is not a whole integer string or has more than 15 significant digits, and an
//! identifier already received in the last 24 h. One request per (customer, event_name) at a
//! time: a concurrent one gets 429 while the first holds the slot. An unknown customer or meter
//! is still answered 200 and reported asynchronously as a thin event, as Stripe does; such
//! events are kept for inspection but never counted.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::params::Params;
use super::Ctx;
use crate::error::Error;
use crate::form::FormValue;
use crate::rules::{cancel_allowed, check_timestamp, identifier_blocks, parse_value, rfc3339};
use crate::state::{App, Inner, MeterEvent};
use crate::webhooks::publish_thin;

/// A meter event after its synchronous checks, ready to be recorded.
pub struct Incoming {
    pub event_name: String,
    pub identifier: String,
    pub payload: BTreeMap<String, String>,
    pub timestamp: i64,
    /// The value, or the code of the problem that makes it invalid (reported asynchronously
    /// on the v2 stream; refused synchronously on v1 before it gets here).
    pub value: Result<i64, &'static str>,
    /// A timestamp problem found by the v2 stream's asynchronous validation.
    pub timestamp_error: Option<&'static str>,
    pub api: &'static str,
}

pub async fn create(ctx: &Ctx, params: &Params) -> Result<Value, Error> {
    params.allow(&["event_name", "payload", "identifier", "timestamp"])?;
    let event_name = params.required_str("event_name")?.to_string();
    if event_name.chars().count() > 100 {
        return Err(Error::bad_value(
            "event_name must be at most 100 characters",
            "event_name",
        ));
    }
    let payload = string_map(
        params
            .map("payload", None)?
            .ok_or_else(|| Error::missing("payload"))?,
    )?;
    let identifier = match params.str("identifier")? {
        Some(id) if id.chars().count() > 100 => {
            return Err(Error::bad_value(
                "identifier must be at most 100 characters",
                "identifier",
            ))
        }
        Some(id) if !id.is_empty() => id.to_string(),
        // Stripe generates one when none is sent, so such events are never deduplicated.
        _ => uuid::Uuid::new_v4().to_string(),
    };
    let timestamp = params.int("timestamp")?;

    let (timestamp, value, slot) = {
        let inner = ctx.app.lock();
        let now = inner.now();
        let timestamp = timestamp.unwrap_or(now);
        check_timestamp(timestamp, now).map_err(|e| {
            Error::invalid(
                e.code(),
                match e {
                    crate::rules::TimestampError::TooFarInPast => {
                        "Timestamp must be within the past 35 calendar days."
                    }
                    crate::rules::TimestampError::InFuture => {
                        "Timestamp must not be more than 5 minutes in the future."
                    }
                },
                Some("timestamp"),
            )
        })?;
        let account = inner
            .accounts
            .get(&ctx.key)
            .ok_or_else(|| Error::unauthorized(None, "account removed"))?;
        let meter = account.meter_by_event_name(&event_name);
        let value_key = meter.map_or("value", |m| m.value_key.as_str());
        let customer_key = meter.map_or("stripe_customer_id", |m| m.customer_key.as_str());
        let value_param = format!("payload[{value_key}]");
        let value = match payload.get(value_key) {
            Some(raw) => parse_value(raw).map_err(|e| {
                Error::invalid(
                    e.code(),
                    format!("Invalid value `{raw}`: the meter event value must be a whole number of at most 15 digits."),
                    Some(&value_param),
                )
            })?,
            // A count meter counts events; the value is not needed.
            None if meter.is_some_and(|m| m.formula == crate::rules::Formula::Count) => 1,
            None => return Err(Error::missing(&value_param)),
        };
        let customer = payload.get(customer_key).cloned().unwrap_or_default();
        (timestamp, value, (customer, event_name.clone()))
    };

    // Hold the (customer, event_name) slot for the whole request, so that a second request on
    // the same pair while this one runs (e.g. under the slow fault) is refused with 429.
    let guard = SlotGuard::acquire(&ctx.app, &ctx.key, slot)?;
    if let Some(delay) = ctx.delay {
        tokio::time::sleep(delay).await;
    }
    let result = {
        let mut inner = ctx.app.lock();
        let now = inner.now();
        let account = inner
            .accounts
            .get_mut(&ctx.key)
            .ok_or_else(|| Error::unauthorized(None, "account removed"))?;
        if let Some(first) = account.identifiers.get(&identifier) {
            if identifier_blocks(*first, now) {
                return Err(Error::invalid(
                    "resource_already_exists",
                    format!("An event already exists with identifier {identifier}. Identifiers must be unique within a rolling 24 hour period."),
                    Some("identifier"),
                ));
            }
        }
        let incoming = Incoming {
            event_name,
            identifier,
            payload,
            timestamp,
            value: Ok(value),
            timestamp_error: None,
            api: "v1",
        };
        record(&ctx.app, &mut inner, &ctx.key, ctx.livemode, incoming)
    };
    drop(guard);
    Ok(result)
}

/// Registers the identifier, decides whether the event counts, stores it, publishes the
/// asynchronous error report if any, and returns the `billing.meter_event` object.
pub fn record(app: &App, inner: &mut Inner, key: &str, livemode: bool, ev: Incoming) -> Value {
    let now = inner.now();
    let Some(account) = inner.accounts.get_mut(key) else {
        return Value::Null;
    };
    account.identifiers.insert(ev.identifier.clone(), now);
    let meter = account.meter_by_event_name(&ev.event_name).cloned();
    let customer_key = meter
        .as_ref()
        .map_or("stripe_customer_id", |m| m.customer_key.as_str());
    let customer = ev.payload.get(customer_key).cloned();
    // The first problem found is the one reported, in the order Stripe's checks would see them.
    let problem: Option<(&'static str, String)> = if meter.is_none() {
        Some((
            "no_meter",
            format!(
                "No active meter was found for event_name `{}`.",
                ev.event_name
            ),
        ))
    } else if let Some(code) = ev.timestamp_error {
        Some((code, format!("Invalid timestamp {}.", ev.timestamp)))
    } else if let Err(code) = ev.value {
        Some((code, "Invalid meter event value.".to_string()))
    } else {
        match &customer {
            None => Some((
                "meter_event_no_customer_defined",
                format!("No customer was defined under payload key `{customer_key}`."),
            )),
            Some(c) if account.customer(c).is_none() => Some((
                "meter_event_customer_not_found",
                format!("Customer {c} was not found."),
            )),
            Some(_) => None,
        }
    };
    let seq = account.next_seq();
    let payload_json: Value = ev
        .payload
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    account.meter_events.push(MeterEvent {
        seq,
        event_name: ev.event_name.clone(),
        identifier: ev.identifier.clone(),
        customer,
        value: *ev.value.as_ref().unwrap_or(&0),
        timestamp: ev.timestamp,
        received_at: now,
        payload: payload_json.clone(),
        meter: meter.as_ref().map(|m| m.id.clone()),
        counted: problem.is_none(),
        cancelled: false,
        api: ev.api,
        error_code: problem.as_ref().map(|(c, _)| c.to_string()),
    });
    if let Some((code, message)) = problem {
        let data = json!({
            "developer_message_summary": format!("There is 1 invalid event: {message}"),
            "reason": {
                "error_count": 1,
                "error_types": [{
                    "code": code,
                    "error_count": 1,
                    "sample_errors": [{
                        "error_message": message,
                        "request": { "identifier": ev.identifier }
                    }]
                }]
            },
            "validation_start": rfc3339(now),
            "validation_end": rfc3339(now)
        });
        match &meter {
            None => publish_thin(
                app,
                inner,
                key,
                "v1.billing.meter.no_meter_found",
                None,
                data,
            ),
            Some(m) => publish_thin(
                app,
                inner,
                key,
                "v1.billing.meter.error_report_triggered",
                Some(json!({
                    "id": m.id,
                    "type": "billing.meter",
                    "url": format!("/v1/billing/meters/{}", m.id)
                })),
                data,
            ),
        }
    }
    json!({
        "object": "billing.meter_event",
        "created": now,
        "event_name": ev.event_name,
        "identifier": ev.identifier,
        "livemode": livemode,
        "payload": payload_json,
        "timestamp": ev.timestamp
    })
}

pub fn adjust(ctx: &Ctx, params: &Params) -> Result<Value, Error> {
    params.allow(&["type", "event_name", "cancel"])?;
    let kind = params.required_str("type")?;
    if kind != "cancel" {
        return Err(Error::bad_value("Invalid type: must be cancel", "type"));
    }
    let event_name = params.required_str("event_name")?;
    let identifier = params
        .map("cancel", Some(&["identifier"]))?
        .ok_or_else(|| Error::missing("cancel"))?
        .required_str("identifier")
        .map_err(|_| Error::missing("cancel[identifier]"))?
        .to_string();
    let mut inner = ctx.app.lock();
    let now = inner.now();
    let account = inner
        .accounts
        .get_mut(&ctx.key)
        .ok_or_else(|| Error::unauthorized(None, "account removed"))?;
    // The latest event under this identifier: an identifier resent after 24 h is a new event.
    let event = account
        .meter_events
        .iter_mut()
        .rev()
        .find(|e| e.identifier == identifier && e.event_name == event_name)
        .ok_or_else(|| {
            Error::invalid(
                "resource_missing",
                format!("No meter event with identifier {identifier} for event_name {event_name}."),
                Some("cancel[identifier]"),
            )
        })?;
    if !cancel_allowed(event.received_at, now) {
        return Err(Error::bad_value(
            format!("Meter event {identifier} can no longer be cancelled: events can only be cancelled within 24 hours of being received."),
            "cancel[identifier]",
        ));
    }
    if event.cancelled {
        return Err(Error::bad_value(
            format!("Meter event {identifier} has already been cancelled."),
            "cancel[identifier]",
        ));
    }
    event.cancelled = true;
    Ok(json!({
        "object": "billing.meter_event_adjustment",
        "cancel": { "identifier": identifier },
        "event_name": event_name,
        "livemode": ctx.livemode,
        "status": "complete",
        "type": "cancel"
    }))
}

fn string_map(params: Params) -> Result<BTreeMap<String, String>, Error> {
    params
        .0
        .into_iter()
        .map(|(k, v)| match v {
            FormValue::Str(s) => Ok((k, s)),
            _ => Err(Error::bad_value(
                "payload values must be strings",
                &format!("payload[{k}]"),
            )),
        })
        .collect()
}

/// The (customer, event_name) slot of one in-flight v1 meter event request; freed on drop.
/// Also keeps the concurrency statistics: how many requests overlapped on the pair.
struct SlotGuard {
    app: App,
    key: String,
    slot: (String, String),
}

impl SlotGuard {
    fn acquire(app: &App, key: &str, slot: (String, String)) -> Result<Self, Error> {
        let mut inner = app.lock();
        let account = inner
            .accounts
            .get_mut(key)
            .ok_or_else(|| Error::unauthorized(None, "account removed"))?;
        let stat = account.stats.concurrency.entry(slot.clone()).or_default();
        stat.0 += 1;
        stat.1 = stat.1.max(stat.0);
        if account.meter_slots.contains(&slot) {
            stat.0 -= 1;
            return Err(Error::TooManyRequests {
                code: "lock_timeout",
                message: format!(
                    "Another meter event request for customer {} and event_name {} is in progress; only one concurrent request per customer and meter is allowed.",
                    slot.0, slot.1
                ),
            });
        }
        account.meter_slots.insert(slot.clone());
        Ok(SlotGuard {
            app: app.clone(),
            key: key.to_string(),
            slot,
        })
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        // Never panic in drop: a poisoned lock is reported by the next regular lock instead.
        let Some(mut inner) = self.app.try_lock() else {
            return;
        };
        if let Some(account) = inner.accounts.get_mut(&self.key) {
            account.meter_slots.remove(&self.slot);
            if let Some(stat) = account.stats.concurrency.get_mut(&self.slot) {
                stat.0 = stat.0.saturating_sub(1);
            }
        }
    }
}
