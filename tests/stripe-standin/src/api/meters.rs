//! `/v1/billing/meters`: create, retrieve, list, and `GET /v1/billing/meters/{id}/event_summaries`
//! (usage per half-open period, aggregated with the meter's formula; cancelled events and events
//! reported asynchronously as errors never count).

use serde_json::{json, Value};

use super::params::Params;
use super::{paginate, Ctx};
use crate::error::Error;
use crate::rules::{aggregate, summary_windows, Formula, Grouping, Sample, WindowError};
use crate::state::Meter;

pub fn create(ctx: &Ctx, params: &Params) -> Result<Value, Error> {
    params.allow(&[
        "display_name",
        "event_name",
        "default_aggregation",
        "customer_mapping",
        "value_settings",
        "event_time_window",
    ])?;
    let display_name = params.required_str("display_name")?;
    let event_name = params.required_str("event_name")?;
    if event_name.chars().count() > 100 {
        return Err(Error::bad_value(
            "event_name must be at most 100 characters",
            "event_name",
        ));
    }
    let aggregation = params
        .map("default_aggregation", Some(&["formula"]))?
        .ok_or_else(|| Error::missing("default_aggregation"))?;
    let raw_formula = aggregation
        .str("formula")?
        .ok_or_else(|| Error::missing("default_aggregation[formula]"))?;
    let formula = Formula::parse(raw_formula).ok_or_else(|| {
        Error::bad_value(
            format!("Invalid default_aggregation[formula]: must be one of sum, count, or last (got {raw_formula})"),
            "default_aggregation[formula]",
        )
    })?;
    let customer_key = match params.map("customer_mapping", Some(&["type", "event_payload_key"]))? {
        Some(mapping) => {
            if mapping.str("type")?.is_some_and(|t| t != "by_id") {
                return Err(Error::bad_value(
                    "Invalid customer_mapping[type]: must be by_id",
                    "customer_mapping[type]",
                ));
            }
            mapping
                .str("event_payload_key")?
                .ok_or_else(|| Error::missing("customer_mapping[event_payload_key]"))?
                .to_string()
        }
        None => "stripe_customer_id".to_string(),
    };
    let value_key = match params.map("value_settings", Some(&["event_payload_key"]))? {
        Some(settings) => settings
            .str("event_payload_key")?
            .ok_or_else(|| Error::missing("value_settings[event_payload_key]"))?
            .to_string(),
        None => "value".to_string(),
    };
    let event_time_window = match params.str("event_time_window")? {
        None => None,
        Some(w @ ("hour" | "day")) => Some(w.to_string()),
        Some(_) => {
            return Err(Error::bad_value(
                "Invalid event_time_window: must be one of hour or day",
                "event_time_window",
            ))
        }
    };
    let mut inner = ctx.app.lock();
    let id = inner.id("mtr");
    let created = inner.now();
    let account = inner
        .accounts
        .get_mut(&ctx.key)
        .ok_or_else(|| Error::unauthorized(None, "account removed"))?;
    // Stripe routes events to meters by event_name, so two active meters cannot share one.
    if account.meter_by_event_name(event_name).is_some() {
        return Err(Error::bad_value(
            format!("An active meter with event_name `{event_name}` already exists."),
            "event_name",
        ));
    }
    let meter = Meter {
        id,
        created,
        event_name: event_name.to_string(),
        display_name: display_name.to_string(),
        formula,
        customer_key,
        value_key,
        event_time_window,
        active: true,
    };
    let body = meter.to_json(ctx.livemode);
    account.meters.push(meter);
    Ok(body)
}

pub fn retrieve(ctx: &Ctx, params: &Params, id: &str) -> Result<Value, Error> {
    params.allow(&[])?;
    let inner = ctx.app.lock();
    inner
        .accounts
        .get(&ctx.key)
        .and_then(|a| a.meters.iter().find(|m| m.id == id))
        .map(|m| m.to_json(ctx.livemode))
        .ok_or_else(|| Error::no_such("billing.meter", id, "id"))
}

pub fn list(ctx: &Ctx, params: &Params) -> Result<Value, Error> {
    params.allow(&["limit", "starting_after", "ending_before", "status"])?;
    let status = params.str("status")?;
    let inner = ctx.app.lock();
    let items = inner
        .accounts
        .get(&ctx.key)
        .map(|a| {
            a.meters
                .iter()
                .rev()
                .filter(|m| match status {
                    Some("active") => m.active,
                    Some("inactive") => !m.active,
                    _ => true,
                })
                .map(|m| (m.id.clone(), m.to_json(ctx.livemode)))
                .collect()
        })
        .unwrap_or_default();
    paginate(params, "/v1/billing/meters", items)
}

pub fn event_summaries(ctx: &Ctx, params: &Params, meter_id: &str) -> Result<Value, Error> {
    params.allow(&[
        "customer",
        "start_time",
        "end_time",
        "value_grouping_window",
        "limit",
        "starting_after",
        "ending_before",
    ])?;
    let customer = params.required_str("customer")?;
    let start = params
        .int("start_time")?
        .ok_or_else(|| Error::missing("start_time"))?;
    let end = params
        .int("end_time")?
        .ok_or_else(|| Error::missing("end_time"))?;
    let grouping = match params.str("value_grouping_window")? {
        None => None,
        Some(raw) => Some(Grouping::parse(raw).ok_or_else(|| {
            Error::bad_value(
                "Invalid value_grouping_window: must be one of hour or day",
                "value_grouping_window",
            )
        })?),
    };
    let windows = summary_windows(start, end, grouping).map_err(|e| match e {
        WindowError::NotMinuteAligned(param) => Error::bad_value(
            format!("{param} must be aligned with minute boundaries"),
            param,
        ),
        WindowError::EmptyRange => {
            Error::bad_value("end_time must be after start_time", "end_time")
        }
    })?;
    let inner = ctx.app.lock();
    let account = inner
        .accounts
        .get(&ctx.key)
        .ok_or_else(|| Error::no_such("billing.meter", meter_id, "id"))?;
    let meter = account
        .meters
        .iter()
        .find(|m| m.id == meter_id)
        .ok_or_else(|| Error::no_such("billing.meter", meter_id, "id"))?;
    if !account.customers.iter().any(|c| c.id == customer) {
        return Err(Error::no_such("customer", customer, "customer"));
    }
    let samples: Vec<(i64, Sample)> = account
        .meter_events
        .iter()
        .filter(|e| {
            e.counted
                && !e.cancelled
                && e.meter.as_deref() == Some(meter_id)
                && e.customer.as_deref() == Some(customer)
        })
        .map(|e| {
            (
                e.timestamp,
                Sample {
                    timestamp: e.timestamp,
                    seq: e.seq,
                    value: e.value,
                },
            )
        })
        .collect();
    let items = windows
        .into_iter()
        .map(|(from, to)| {
            let in_window: Vec<Sample> = samples
                .iter()
                .filter(|(t, _)| *t >= from && *t < to)
                .map(|(_, s)| *s)
                .collect();
            let id = format!("mtrusg_{}_{}_{from}", &meter.id, customer);
            let body = json!({
                "id": id,
                "object": "billing.meter_event_summary",
                "aggregated_value": aggregate(meter.formula, &in_window),
                "end_time": to,
                "livemode": ctx.livemode,
                "meter": meter.id,
                "start_time": from
            });
            (id, body)
        })
        .collect();
    paginate(
        params,
        &format!("/v1/billing/meters/{meter_id}/event_summaries"),
        items,
    )
}
