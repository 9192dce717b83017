//! `usage.resync`: manual sync requests, written by stripe-sink (`POST /v1/stripe/sync/manual`),
//! read by the aggregator, which answers with `reason: "resync"` window totals.
//!
//! Rules kept here: the key is `{tenant_id}:{environment_id}`, so one environment's requests are
//! handled in order; the requested range is a valid [`TimeRange`] (`time_from < time_to`).

use std::borrow::Cow;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::codec::{message_codec, SchemaVersion1, WireForm};
use crate::error::SchemaError;
use crate::ids::{CustomerId, EnvironmentId, JobId, MeterId, TenantId};
use crate::timestamp::Timestamp;
use crate::topic::Topic;
use crate::window::TimeRange;

/// A request to recompute and resend window totals over a time range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncRequest {
    /// The sync job this request belongs to.
    pub job_id: JobId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// The tenant's environment.
    pub environment_id: EnvironmentId,
    /// Only this customer; every customer when `None`.
    pub customer_id: Option<CustomerId>,
    /// Only this meter; every meter when `None`.
    pub meter_id: Option<MeterId>,
    /// The event time range `[time_from, time_to)`.
    pub range: TimeRange,
    /// Resend even windows the ledger says were already fully sent.
    pub force_rerun: bool,
    /// When the request was made.
    pub requested_at: Timestamp,
}

message_codec!(ResyncRequest, Topic::UsageResync, key: [tenant_id, environment_id]);

/// A manual sync request on the `usage.resync` Kafka topic: recompute and resend the window totals of events with time_from <= timestamp < time_to. Key: "{tenant_id}:{environment_id}". Unknown fields are rejected. Rule a JSON Schema cannot state, checked by meterline on read: time_from < time_to.
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    rename = "ResyncRequest",
    expecting = "a usage.resync message object"
)]
#[schemars(title = "usage.resync message (schema_version 1)")]
pub(crate) struct Wire<'a> {
    /// Always 1 for this schema.
    schema_version: SchemaVersion1,
    /// The sync job this request belongs to.
    job_id: Cow<'a, JobId>,
    /// Owning tenant.
    tenant_id: Cow<'a, TenantId>,
    /// The tenant's environment.
    environment_id: Cow<'a, EnvironmentId>,
    /// Restrict the resync to this customer; absent means every customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    customer_id: Option<Cow<'a, CustomerId>>,
    /// Restrict the resync to this meter; absent means every meter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    meter_id: Option<Cow<'a, MeterId>>,
    /// Inclusive start of the event time range.
    time_from: Timestamp,
    /// Exclusive end of the event time range; must be after time_from.
    time_to: Timestamp,
    /// Resend even windows the ledger says were already fully sent.
    force_rerun: bool,
    /// When the request was made.
    requested_at: Timestamp,
}

impl WireForm for ResyncRequest {
    type Wire<'a> = Wire<'a>;

    fn to_wire(&self) -> Wire<'_> {
        Wire {
            schema_version: SchemaVersion1,
            job_id: Cow::Borrowed(&self.job_id),
            tenant_id: Cow::Borrowed(&self.tenant_id),
            environment_id: Cow::Borrowed(&self.environment_id),
            customer_id: self.customer_id.as_ref().map(Cow::Borrowed),
            meter_id: self.meter_id.as_ref().map(Cow::Borrowed),
            time_from: self.range.from(),
            time_to: self.range.to(),
            force_rerun: self.force_rerun,
            requested_at: self.requested_at,
        }
    }

    fn from_wire(wire: Wire<'_>) -> Result<Self, SchemaError> {
        Ok(Self {
            range: TimeRange::new(wire.time_from, wire.time_to)?,
            job_id: wire.job_id.into_owned(),
            tenant_id: wire.tenant_id.into_owned(),
            environment_id: wire.environment_id.into_owned(),
            customer_id: wire.customer_id.map(Cow::into_owned),
            meter_id: wire.meter_id.map(Cow::into_owned),
            force_rerun: wire.force_rerun,
            requested_at: wire.requested_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> Timestamp {
        Timestamp::parse(text).expect("valid")
    }

    fn sample() -> ResyncRequest {
        ResyncRequest {
            job_id: JobId::parse("0190c5a2-7b1e-7c3d-9e4f-a1b2c3d4e5f6").expect("valid"),
            tenant_id: TenantId::parse("acme").expect("valid"),
            environment_id: EnvironmentId::parse("prod").expect("valid"),
            customer_id: None,
            meter_id: Some(MeterId::parse("api_calls").expect("valid")),
            range: TimeRange::new(ts("2024-05-01T00:00:00Z"), ts("2024-05-02T00:00:00Z"))
                .expect("valid"),
            force_rerun: false,
            requested_at: ts("2024-05-03T09:00:00Z"),
        }
    }

    #[test]
    fn roundtrip_and_key() {
        let request = sample();
        let bytes = request.to_json_bytes();
        let text = String::from_utf8(bytes.clone()).expect("utf-8");
        assert!(!text.contains("customer_id"), "{text}");
        assert_eq!(
            ResyncRequest::from_json_bytes(&bytes).expect("parse"),
            request
        );
        assert_eq!(request.kafka_key(), "acme:prod");
    }

    #[test]
    fn range_must_not_be_empty_or_reversed() {
        let text = String::from_utf8(sample().to_json_bytes()).expect("utf-8");
        for to in ["2024-05-01T00:00:00Z", "2024-04-30T00:00:00Z"] {
            let bad = text.replace("2024-05-02T00:00:00Z", to);
            let err = ResyncRequest::from_json_bytes(bad.as_bytes()).expect_err(to);
            assert!(
                err.to_string()
                    .starts_with("invalid time range: time_from must be before time_to"),
                "{err}"
            );
        }
    }
}
