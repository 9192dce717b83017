//! `usage.raw`: one usage event per message, written by ingest and by producers that write Kafka
//! directly, read by the aggregator.
//!
//! Rule kept here: the key is `{tenant_id}:{environment_id}:{customer_id}`, so one customer's
//! events land in one partition and stay in order; the value is [`RawUsageEvent`] as JSON, and
//! anything the schema does not name is rejected.

use std::borrow::Cow;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::codec::{message_codec, SchemaVersion1, WireForm};
use crate::error::SchemaError;
use crate::ids::{CustomerId, EnvironmentId, EventId, EventName, EventSource, TenantId};
use crate::timestamp::Timestamp;
use crate::topic::Topic;

/// A usage event: something a customer did that meters may count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawUsageEvent {
    /// The producer's deduplication key: an id counts once in any total.
    pub id: EventId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// The tenant's environment.
    pub environment_id: EnvironmentId,
    /// The producer's customer.
    pub customer_id: CustomerId,
    /// What happened; meters select events by it.
    pub event_name: EventName,
    /// When it happened (decides the window).
    pub timestamp: Timestamp,
    /// Producer-defined values meters aggregate or filter on; any JSON values.
    pub properties: Map<String, Value>,
    /// Label of the producing system, if given.
    pub source: Option<EventSource>,
    /// When ingest accepted it; absent for direct producers.
    pub ingested_at: Option<Timestamp>,
}

message_codec!(RawUsageEvent, Topic::UsageRaw, key: [tenant_id, environment_id, customer_id]);

/// One usage event on the `usage.raw` Kafka topic. Key: "{tenant_id}:{environment_id}:{customer_id}". Unknown fields are rejected.
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    rename = "RawUsageEvent",
    expecting = "a usage.raw message object"
)]
#[schemars(title = "usage.raw message (schema_version 1)")]
pub(crate) struct Wire<'a> {
    /// Always 1 for this schema.
    schema_version: SchemaVersion1,
    /// Event id and deduplication key: an event id counts once in any total.
    id: Cow<'a, EventId>,
    /// Owning tenant.
    tenant_id: Cow<'a, TenantId>,
    /// The tenant's environment.
    environment_id: Cow<'a, EnvironmentId>,
    /// The producer's customer.
    customer_id: Cow<'a, CustomerId>,
    /// What happened; meters select events by this name.
    event_name: Cow<'a, EventName>,
    /// When the event happened; decides its aggregation window.
    timestamp: Timestamp,
    /// Producer-defined values that meters aggregate (SUM, MAX, ...) or filter on. A JSON object, possibly empty; values may be any JSON.
    properties: Cow<'a, Map<String, Value>>,
    /// Optional label of the producing system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<Cow<'a, EventSource>>,
    /// Set by the ingest service when it accepted the event; direct Kafka producers leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ingested_at: Option<Timestamp>,
}

impl WireForm for RawUsageEvent {
    type Wire<'a> = Wire<'a>;

    fn to_wire(&self) -> Wire<'_> {
        Wire {
            schema_version: SchemaVersion1,
            id: Cow::Borrowed(&self.id),
            tenant_id: Cow::Borrowed(&self.tenant_id),
            environment_id: Cow::Borrowed(&self.environment_id),
            customer_id: Cow::Borrowed(&self.customer_id),
            event_name: Cow::Borrowed(&self.event_name),
            timestamp: self.timestamp,
            properties: Cow::Borrowed(&self.properties),
            source: self.source.as_ref().map(Cow::Borrowed),
            ingested_at: self.ingested_at,
        }
    }

    fn from_wire(wire: Wire<'_>) -> Result<Self, SchemaError> {
        Ok(Self {
            id: wire.id.into_owned(),
            tenant_id: wire.tenant_id.into_owned(),
            environment_id: wire.environment_id.into_owned(),
            customer_id: wire.customer_id.into_owned(),
            event_name: wire.event_name.into_owned(),
            timestamp: wire.timestamp,
            properties: wire.properties.into_owned(),
            source: wire.source.map(Cow::into_owned),
            ingested_at: wire.ingested_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> RawUsageEvent {
        RawUsageEvent {
            id: EventId::parse("evt-1").expect("valid"),
            tenant_id: TenantId::parse("acme").expect("valid"),
            environment_id: EnvironmentId::parse("prod").expect("valid"),
            customer_id: CustomerId::parse("cus_42").expect("valid"),
            event_name: EventName::parse("api_call").expect("valid"),
            timestamp: Timestamp::parse("2024-05-01T12:00:00Z").expect("valid"),
            properties: Map::new(),
            source: None,
            ingested_at: None,
        }
    }

    #[test]
    fn roundtrip_and_optional_fields_left_out() {
        let event = sample();
        let bytes = event.to_json_bytes();
        let value: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(
            value,
            json!({
                "schema_version": 1,
                "id": "evt-1",
                "tenant_id": "acme",
                "environment_id": "prod",
                "customer_id": "cus_42",
                "event_name": "api_call",
                "timestamp": "2024-05-01T12:00:00Z",
                "properties": {}
            })
        );
        assert_eq!(
            RawUsageEvent::from_json_bytes(&bytes).expect("parse"),
            event
        );
    }

    #[test]
    fn key_keeps_a_customer_in_one_partition() {
        assert_eq!(sample().kafka_key(), "acme:prod:cus_42");
    }

    #[test]
    fn null_optionals_read_as_absent() {
        let mut value: Value = serde_json::from_slice(&sample().to_json_bytes()).expect("json");
        value["source"] = Value::Null;
        value["ingested_at"] = Value::Null;
        let bytes = serde_json::to_vec(&value).expect("json");
        assert_eq!(
            RawUsageEvent::from_json_bytes(&bytes).expect("parse"),
            sample()
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            (r#"{"schema_version":1}"#, "missing field `id`"),
            (
                r#"{"schema_version":1,"id":""}"#,
                "invalid id: must not be empty",
            ),
            (r#"{"schema_version":1,"bogus":1}"#, "unknown field `bogus`"),
            (
                r#"{"schema_version":3,"id":"x"}"#,
                "unsupported schema_version 3, expected 1",
            ),
            (
                r#"{"schema_version":1,"properties":[]}"#,
                "invalid type: sequence, expected a map",
            ),
            (
                "[]",
                "invalid type: sequence, expected a usage.raw message object",
            ),
            ("", "malformed json: EOF while parsing"),
        ];
        for (input, expected) in cases {
            let err = RawUsageEvent::from_json_bytes(input.as_bytes()).expect_err(input);
            assert!(err.to_string().starts_with(expected), "{input}: {err}");
        }
    }
}
