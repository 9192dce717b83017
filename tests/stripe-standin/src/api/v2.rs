//! The v2 high-throughput pair: `POST /v2/billing/meter_event_session` (a token valid 15
//! minutes on the stand-in clock) and `POST /v2/billing/meter_event_stream` (JSON, Bearer
//! token, 1..=100 events). The stream checks only the request's shape synchronously; every
//! event rule (timestamp, value, customer, meter) is applied afterwards and reported as thin
//! events, as Stripe does. Identifiers already seen inside the 24 h window are dropped silently.
//! Also `GET /v2/core/events/{id}`, where thin events' details are fetched.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::meter_events::{record, Incoming};
use super::Ctx;
use crate::error::Error;
use crate::rules::{
    check_timestamp, identifier_blocks, parse_rfc3339, parse_value, rfc3339, MAX_STREAM_EVENTS,
    SESSION_TTL_SECS,
};
use crate::state::Session;

pub fn bad_body(message: &str) -> Error {
    Error::InvalidRequest {
        status: StatusCode::BAD_REQUEST,
        code: None,
        message: message.to_string(),
        param: None,
    }
}

pub fn create_session(ctx: &Ctx) -> Result<Value, Error> {
    let mut inner = ctx.app.lock();
    let now = inner.now();
    let id = inner.id("mes");
    let token = format!("mes_token_{}", uuid::Uuid::new_v4().simple());
    let expires_at = now + SESSION_TTL_SECS;
    inner.sessions.insert(
        token.clone(),
        Session {
            account_key: ctx.key.clone(),
            expires_at,
        },
    );
    Ok(json!({
        "id": id,
        "object": "v2.billing.meter_event_session",
        "authentication_token": token,
        "created": rfc3339(now),
        "expires_at": rfc3339(expires_at),
        "livemode": ctx.livemode
    }))
}

pub fn stream(ctx: &Ctx, body: &Value) -> Result<Value, Error> {
    let events = body
        .get("events")
        .and_then(Value::as_array)
        .ok_or_else(|| bad_body("`events` must be an array of meter events"))?;
    if events.is_empty() || events.len() > MAX_STREAM_EVENTS {
        return Err(bad_body(&format!(
            "`events` must hold between 1 and {MAX_STREAM_EVENTS} meter events"
        )));
    }
    // Shape first, for every event, so a malformed request records nothing.
    let mut parsed = Vec::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        parsed.push(parse_event(i, event)?);
    }
    let mut inner = ctx.app.lock();
    let now = inner.now();
    for (event_name, identifier, payload, timestamp) in parsed {
        let Some(account) = inner.accounts.get(&ctx.key) else {
            break;
        };
        if account
            .identifiers
            .get(&identifier)
            .is_some_and(|first| identifier_blocks(*first, now))
        {
            continue;
        }
        let timestamp = timestamp.unwrap_or(now);
        let meter = account.meter_by_event_name(&event_name);
        let value_key = meter.map_or("value", |m| m.value_key.as_str());
        let value = match payload.get(value_key) {
            Some(raw) => parse_value(raw).map_err(|e| e.code()),
            None if meter.is_some_and(|m| m.formula == crate::rules::Formula::Count) => Ok(1),
            None => Err("meter_event_invalid_value"),
        };
        let incoming = Incoming {
            event_name,
            identifier,
            payload,
            timestamp,
            value,
            timestamp_error: check_timestamp(timestamp, now).err().map(|e| e.code()),
            api: "v2",
        };
        record(&ctx.app, &mut inner, &ctx.key, ctx.livemode, incoming);
    }
    Ok(json!({}))
}

type ParsedEvent = (String, String, BTreeMap<String, String>, Option<i64>);

fn parse_event(i: usize, event: &Value) -> Result<ParsedEvent, Error> {
    let field = |name: &str| format!("events[{i}].{name}");
    let obj = event
        .as_object()
        .ok_or_else(|| bad_body(&format!("events[{i}] must be an object")))?;
    if let Some(unknown) = obj
        .keys()
        .find(|k| !["event_name", "identifier", "payload", "timestamp"].contains(&k.as_str()))
    {
        return Err(bad_body(&format!("unknown field {}", field(unknown))));
    }
    let event_name = obj
        .get("event_name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.chars().count() <= 100)
        .ok_or_else(|| {
            bad_body(&format!(
                "{} is required (1 to 100 characters)",
                field("event_name")
            ))
        })?
        .to_string();
    let identifier = match obj.get("identifier") {
        None | Some(Value::Null) => uuid::Uuid::new_v4().to_string(),
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= 100 => s.clone(),
        Some(_) => {
            return Err(bad_body(&format!(
                "{} must be a string of 1 to 100 characters",
                field("identifier")
            )))
        }
    };
    let payload = obj
        .get("payload")
        .and_then(Value::as_object)
        .ok_or_else(|| bad_body(&format!("{} is required", field("payload"))))?
        .iter()
        .map(|(k, v)| {
            v.as_str()
                .map(|s| (k.clone(), s.to_string()))
                .ok_or_else(|| bad_body(&format!("{}.{k} must be a string", field("payload"))))
        })
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let timestamp = match obj.get("timestamp") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(parse_rfc3339(s).ok_or_else(|| {
            bad_body(&format!(
                "{} must be an RFC 3339 timestamp",
                field("timestamp")
            ))
        })?),
        Some(_) => {
            return Err(bad_body(&format!(
                "{} must be an RFC 3339 timestamp",
                field("timestamp")
            )))
        }
    };
    Ok((event_name, identifier, payload, timestamp))
}

pub fn retrieve_event(ctx: &Ctx, id: &str) -> Result<Value, Error> {
    let inner = ctx.app.lock();
    inner
        .accounts
        .get(&ctx.key)
        .and_then(|a| a.thin_events.iter().find(|e| e["id"] == id))
        .cloned()
        .ok_or_else(|| Error::no_such("event", id, "id"))
}
