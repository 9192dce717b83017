//! `usage.windows`: one window total per message, written by the aggregator (when a window is
//! due, when a late event changes it, and for resync jobs), read by stripe-sink.
//!
//! Rules kept here: the key is `{tenant}:{env}:{customer}:{meter}`, so all revisions of one
//! customer's meter stay in order; the bounds form a valid [`Window`]; a resync total carries its
//! `job_id` and no other total does (the type [`WindowReason`] makes that the only shape).

use std::borrow::Cow;
use std::num::NonZeroU32;

use rust_decimal::Decimal;
use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};

use crate::codec::{decimal_string, message_codec, SchemaVersion1, WireForm};
use crate::error::SchemaError;
use crate::ids::{CustomerId, EnvironmentId, JobId, MeterId, TenantId};
use crate::timestamp::{whole_minute_schema, Timestamp};
use crate::topic::Topic;
use crate::window::Window;

/// Why a window total was published.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WindowReason {
    /// The window closed (end plus grace period passed).
    Due,
    /// A late event changed an already published window; `revision` went up.
    Late,
    /// A manual sync job asked for it.
    Resync {
        /// The job that asked.
        job_id: JobId,
    },
}

impl WindowReason {
    /// The wire name: `due`, `late` or `resync`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Due => "due",
            Self::Late => "late",
            Self::Resync { .. } => "resync",
        }
    }

    /// The resync job, for a resync total.
    pub fn job_id(&self) -> Option<&JobId> {
        match self {
            Self::Resync { job_id } => Some(job_id),
            Self::Due | Self::Late => None,
        }
    }
}

/// The total of one meter for one customer over one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowTotal {
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// The tenant's environment.
    pub environment_id: EnvironmentId,
    /// The producer's customer.
    pub customer_id: CustomerId,
    /// The meter this total is for.
    pub meter_id: MeterId,
    /// The window `[window_start, window_end)`.
    pub window: Window,
    /// The meter's aggregate over the window (SUM, COUNT, MAX, ...), exact: for a meter
    /// billing the period to date, from the period's start; for a count or sum, cut where a
    /// billing period ends inside the window, the window after it counting the rest.
    pub quantity: Decimal,
    /// How many distinct events went into it.
    pub event_count: u64,
    /// 1 for the first publication of the window, one more for each re-publication.
    pub revision: NonZeroU32,
    /// Why it was published (and the job, for a resync).
    pub reason: WindowReason,
    /// The window is older than Stripe's 35-day limit for meter events: it cannot be sent.
    pub expired: bool,
    /// When the aggregator computed it.
    pub computed_at: Timestamp,
    /// The timestamp of the latest event counted (for a meter billing the period to date,
    /// the latest up to the window's end): meter events are stamped no later than it, so
    /// usage is not moved towards the next billing period. `None` from an aggregator that
    /// predates it.
    pub last_event_at: Option<Timestamp>,
    /// The end of the billing period the window is billed in: the customer's Stripe
    /// subscription period when Stripe named it, else the calendar month in UTC
    /// ([`PeriodCalendar`](crate::PeriodCalendar)). Meter events are stamped before it.
    /// `None` from an aggregator that predates it: the calendar month.
    pub period_end: Option<Timestamp>,
}

message_codec!(
    WindowTotal,
    Topic::UsageWindows,
    key: [tenant_id, environment_id, customer_id, meter_id]
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(rename = "WindowReason")]
/// Why the total was published: "due" (the window closed), "late" (a late event changed an already published window), "resync" (a manual sync job asked for it; job_id is then required).
enum ReasonTag {
    Due,
    Late,
    Resync,
}

/// One window total on the `usage.windows` Kafka topic: the aggregate of one meter for one customer over the window [window_start, window_end). Key: "{tenant_id}:{environment_id}:{customer_id}:{meter_id}". Unknown fields are rejected. Rules a JSON Schema cannot state, checked by meterline on read: window_start < window_end, window_start is a multiple of the window size (window_end - window_start) since 1970-01-01T00:00:00Z, last_event_at, when present, is before window_end, and period_end, when present, is after window_start.
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    rename = "WindowTotal",
    expecting = "a usage.windows message object"
)]
#[schemars(
    title = "usage.windows message (schema_version 1)",
    transform = job_id_only_for_resync
)]
pub(crate) struct Wire<'a> {
    /// Always 1 for this schema.
    schema_version: SchemaVersion1,
    /// Owning tenant.
    tenant_id: Cow<'a, TenantId>,
    /// The tenant's environment.
    environment_id: Cow<'a, EnvironmentId>,
    /// The producer's customer.
    customer_id: Cow<'a, CustomerId>,
    /// The meter this total is for.
    meter_id: Cow<'a, MeterId>,
    /// Inclusive window start (UTC-aligned to the window size).
    #[schemars(schema_with = "whole_minute_schema")]
    window_start: Timestamp,
    /// Exclusive window end; an event at exactly window_end belongs to the next window.
    #[schemars(schema_with = "whole_minute_schema")]
    window_end: Timestamp,
    /// The meter's aggregate over the window, as an exact decimal string.
    #[serde(with = "decimal_string")]
    #[schemars(schema_with = "decimal_string::schema")]
    quantity: Decimal,
    /// Number of distinct events aggregated into the total.
    event_count: u64,
    /// 1 for the first publication of this window, incremented on every re-publication; the highest revision wins.
    revision: NonZeroU32,
    /// Why the total was published; "resync" requires job_id.
    reason: ReasonTag,
    /// The resync job that asked for this total: required when reason is "resync", absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    job_id: Option<Cow<'a, JobId>>,
    /// The window is older than Stripe's 35-day limit for meter events and will not be sent.
    expired: bool,
    /// When the aggregator computed the total.
    computed_at: Timestamp,
    /// The timestamp of the latest event in the total (for a meter that bills the period to date, the latest up to window_end); before window_end. Optional: absent from older aggregators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_event_at: Option<Timestamp>,
    /// The end of the billing period the window is billed in (the customer's Stripe subscription period when known, else the calendar month in UTC); after window_start. Optional: absent from older aggregators, which bill calendar months.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    period_end: Option<Timestamp>,
}

/// Adds the cross-field rule on `job_id` to the generated schema.
fn job_id_only_for_resync(schema: &mut Schema) {
    schema.insert(
        "if".to_owned(),
        serde_json::json!({
            "properties": { "reason": { "const": "resync" } },
            "required": ["reason"],
        }),
    );
    schema.insert(
        "then".to_owned(),
        serde_json::json!({
            "required": ["job_id"],
            "properties": { "job_id": { "$ref": "#/$defs/JobId" } },
        }),
    );
    schema.insert(
        "else".to_owned(),
        serde_json::json!({
            "properties": { "job_id": { "type": "null" } },
        }),
    );
}

impl WireForm for WindowTotal {
    type Wire<'a> = Wire<'a>;

    fn to_wire(&self) -> Wire<'_> {
        let reason = match self.reason {
            WindowReason::Due => ReasonTag::Due,
            WindowReason::Late => ReasonTag::Late,
            WindowReason::Resync { .. } => ReasonTag::Resync,
        };
        Wire {
            schema_version: SchemaVersion1,
            tenant_id: Cow::Borrowed(&self.tenant_id),
            environment_id: Cow::Borrowed(&self.environment_id),
            customer_id: Cow::Borrowed(&self.customer_id),
            meter_id: Cow::Borrowed(&self.meter_id),
            window_start: self.window.start_timestamp(),
            window_end: self.window.end_timestamp(),
            quantity: self.quantity,
            event_count: self.event_count,
            revision: self.revision,
            reason,
            job_id: self.reason.job_id().map(Cow::Borrowed),
            expired: self.expired,
            computed_at: self.computed_at,
            last_event_at: self.last_event_at,
            period_end: self.period_end,
        }
    }

    fn from_wire(wire: Wire<'_>) -> Result<Self, SchemaError> {
        let window = Window::from_bounds(wire.window_start, wire.window_end)?;
        if wire
            .last_event_at
            .is_some_and(|at| at.as_offset_date_time() >= window.end())
        {
            return Err(SchemaError::invalid(
                "last_event_at",
                "must be before window_end",
            ));
        }
        if wire
            .period_end
            .is_some_and(|at| at.as_offset_date_time() <= window.start())
        {
            return Err(SchemaError::invalid(
                "period_end",
                "must be after window_start",
            ));
        }
        let reason = match (wire.reason, wire.job_id) {
            (ReasonTag::Resync, Some(job_id)) => WindowReason::Resync {
                job_id: job_id.into_owned(),
            },
            (ReasonTag::Resync, None) => {
                return Err(SchemaError::invalid(
                    "job_id",
                    "is required when reason is resync",
                ))
            }
            (ReasonTag::Due | ReasonTag::Late, Some(_)) => {
                return Err(SchemaError::invalid(
                    "job_id",
                    "must be absent unless reason is resync",
                ))
            }
            (ReasonTag::Due, None) => WindowReason::Due,
            (ReasonTag::Late, None) => WindowReason::Late,
        };
        Ok(Self {
            tenant_id: wire.tenant_id.into_owned(),
            environment_id: wire.environment_id.into_owned(),
            customer_id: wire.customer_id.into_owned(),
            meter_id: wire.meter_id.into_owned(),
            window,
            quantity: wire.quantity,
            event_count: wire.event_count,
            revision: wire.revision,
            reason,
            expired: wire.expired,
            computed_at: wire.computed_at,
            last_event_at: wire.last_event_at,
            period_end: wire.period_end,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn sample(reason: WindowReason) -> WindowTotal {
        WindowTotal {
            tenant_id: TenantId::parse("acme").expect("valid"),
            environment_id: EnvironmentId::parse("prod").expect("valid"),
            customer_id: CustomerId::parse("cus_42").expect("valid"),
            meter_id: MeterId::parse("api_calls").expect("valid"),
            window: Window::new(
                time::macros::datetime!(2024-05-01 12:00 UTC),
                time::macros::datetime!(2024-05-01 13:00 UTC),
            )
            .expect("valid"),
            quantity: Decimal::new(125, 1),
            event_count: 3,
            revision: NonZeroU32::MIN,
            reason,
            expired: false,
            computed_at: Timestamp::parse("2024-05-01T13:05:00Z").expect("valid"),
            last_event_at: None,
            period_end: None,
        }
    }

    fn with(base: &WindowTotal, field: &str, value: Value) -> Vec<u8> {
        let mut json: Value = serde_json::from_slice(&base.to_json_bytes()).expect("json");
        if value.is_null() {
            json.as_object_mut().expect("object").remove(field);
        } else {
            json[field] = value;
        }
        serde_json::to_vec(&json).expect("json")
    }

    #[test]
    fn roundtrip_each_reason() {
        let job = JobId::parse("0190c5a2-7b1e-7c3d-9e4f-a1b2c3d4e5f6").expect("valid");
        for reason in [
            WindowReason::Due,
            WindowReason::Late,
            WindowReason::Resync { job_id: job },
        ] {
            let total = sample(reason);
            let bytes = total.to_json_bytes();
            assert_eq!(WindowTotal::from_json_bytes(&bytes).expect("parse"), total);
        }
    }

    #[test]
    fn wire_shape() {
        let value: Value =
            serde_json::from_slice(&sample(WindowReason::Due).to_json_bytes()).expect("json");
        assert_eq!(value["quantity"], json!("12.5"));
        assert_eq!(value["window_start"], json!("2024-05-01T12:00:00Z"));
        assert_eq!(value["reason"], json!("due"));
        assert!(value.get("job_id").is_none());
        assert_eq!(
            sample(WindowReason::Due).kafka_key(),
            "acme:prod:cus_42:api_calls"
        );
    }

    #[test]
    fn job_id_goes_with_resync_only() {
        let due = sample(WindowReason::Due);
        let err = WindowTotal::from_json_bytes(&with(&due, "reason", json!("resync")))
            .expect_err("resync without job");
        assert!(
            err.to_string()
                .starts_with("invalid job_id: is required when reason is resync"),
            "{err}"
        );
        let err = WindowTotal::from_json_bytes(&with(
            &due,
            "job_id",
            json!("0190c5a2-7b1e-7c3d-9e4f-a1b2c3d4e5f6"),
        ))
        .expect_err("job with due");
        assert!(
            err.to_string()
                .starts_with("invalid job_id: must be absent"),
            "{err}"
        );
    }

    #[test]
    fn window_rules_apply_on_read() {
        let due = sample(WindowReason::Due);
        let cases = [
            // 12:20..13:00 is 40 minutes, and 12:20 is not a multiple of 40 minutes since the epoch.
            ("window_start", json!("2024-05-01T12:20:00Z"), "aligned"),
            (
                "window_start",
                json!("2024-05-01T13:00:00Z"),
                "start must be before end",
            ),
            ("window_end", json!("2024-05-01T12:59:30Z"), "whole minutes"),
            (
                "last_event_at",
                json!("2024-05-01T13:00:00Z"),
                "must be before window_end",
            ),
            (
                "period_end",
                json!("2024-05-01T12:00:00Z"),
                "must be after window_start",
            ),
        ];
        for (field, value, reason) in cases {
            let err = WindowTotal::from_json_bytes(&with(&due, field, value)).expect_err(reason);
            assert!(err.to_string().contains(reason), "{err}");
        }
        let stamped = WindowTotal::from_json_bytes(&with(
            &due,
            "last_event_at",
            json!("2024-05-01T12:59:41.25Z"),
        ))
        .expect("an event before the end");
        assert_eq!(
            stamped.last_event_at,
            Some(Timestamp::parse("2024-05-01T12:59:41.25Z").expect("valid"))
        );
        assert_eq!(
            WindowTotal::from_json_bytes(&stamped.to_json_bytes()).expect("round trip"),
            stamped
        );
    }

    #[test]
    fn quantity_and_revision_rules() {
        let due = sample(WindowReason::Due);
        for bad in [json!(12.5), json!("12,5"), json!("1e3"), json!("")] {
            assert!(
                WindowTotal::from_json_bytes(&with(&due, "quantity", bad.clone())).is_err(),
                "{bad}"
            );
        }
        assert!(WindowTotal::from_json_bytes(&with(&due, "revision", json!(0))).is_err());
        assert!(WindowTotal::from_json_bytes(&with(&due, "event_count", json!(-1))).is_err());
    }
}
