//! `stripe.webhooks`: Stripe events whose signature the webhook relay verified, read by
//! stripe-sink (customer mappings, meter error reports).
//!
//! Rules kept here: the key is `{tenant_id}:{environment_id}`, so one environment's Stripe events
//! are handled in order; `payload` is the verified event object as Stripe sent it (member order
//! is kept; the signature was checked over the raw bytes before this message was built).

use std::borrow::Cow;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::codec::{message_codec, SchemaVersion1, WireForm};
use crate::error::SchemaError;
use crate::ids::{EnvironmentId, StripeEventId, StripeEventType, TenantId};
use crate::timestamp::Timestamp;
use crate::topic::Topic;

/// A verified Stripe event, addressed to one tenant's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeWebhook {
    /// Tenant from the webhook URL.
    pub tenant_id: TenantId,
    /// Environment from the webhook URL.
    pub environment_id: EnvironmentId,
    /// Stripe's event id (`evt_...`), the relay's deduplication key.
    pub event_id: StripeEventId,
    /// Stripe's event type, e.g. `customer.created`.
    pub event_type: StripeEventType,
    /// Whether the event came from live mode.
    pub livemode: bool,
    /// Stripe's `created`, Unix seconds.
    pub created: i64,
    /// When the relay received it.
    pub received_at: Timestamp,
    /// The whole verified event object.
    pub payload: Map<String, Value>,
}

message_codec!(StripeWebhook, Topic::StripeWebhooks, key: [tenant_id, environment_id]);

/// A Stripe event on the `stripe.webhooks` Kafka topic, published by the webhook relay after it verified the Stripe-Signature. Key: "{tenant_id}:{environment_id}". Unknown fields are rejected.
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    rename = "StripeWebhook",
    expecting = "a stripe.webhooks message object"
)]
#[schemars(title = "stripe.webhooks message (schema_version 1)")]
pub(crate) struct Wire<'a> {
    /// Always 1 for this schema.
    schema_version: SchemaVersion1,
    /// Tenant the webhook endpoint belongs to.
    tenant_id: Cow<'a, TenantId>,
    /// Environment the webhook endpoint belongs to.
    environment_id: Cow<'a, EnvironmentId>,
    /// Stripe's event id (the "id" of the event object), used to deduplicate deliveries.
    event_id: Cow<'a, StripeEventId>,
    /// Stripe's event type (the "type" of the event object), e.g. "customer.created".
    event_type: Cow<'a, StripeEventType>,
    /// Stripe's "livemode" flag of the event.
    livemode: bool,
    /// Stripe's "created" of the event, Unix seconds.
    created: i64,
    /// When the relay received the webhook.
    received_at: Timestamp,
    /// The verified Stripe event object, verbatim.
    payload: Cow<'a, Map<String, Value>>,
}

impl WireForm for StripeWebhook {
    type Wire<'a> = Wire<'a>;

    fn to_wire(&self) -> Wire<'_> {
        Wire {
            schema_version: SchemaVersion1,
            tenant_id: Cow::Borrowed(&self.tenant_id),
            environment_id: Cow::Borrowed(&self.environment_id),
            event_id: Cow::Borrowed(&self.event_id),
            event_type: Cow::Borrowed(&self.event_type),
            livemode: self.livemode,
            created: self.created,
            received_at: self.received_at,
            payload: Cow::Borrowed(&self.payload),
        }
    }

    fn from_wire(wire: Wire<'_>) -> Result<Self, SchemaError> {
        Ok(Self {
            tenant_id: wire.tenant_id.into_owned(),
            environment_id: wire.environment_id.into_owned(),
            event_id: wire.event_id.into_owned(),
            event_type: wire.event_type.into_owned(),
            livemode: wire.livemode,
            created: wire.created,
            received_at: wire.received_at,
            payload: wire.payload.into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn roundtrip_keeps_payload_member_order() {
        let input = br#"{"schema_version":1,"tenant_id":"acme","environment_id":"prod","event_id":"evt_1","event_type":"customer.created","livemode":false,"created":1714564800,"received_at":"2024-05-01T12:00:01Z","payload":{"id":"evt_1","object":"event","data":{"object":{"id":"cus_1","metadata":{"external_id":"c-42"}}},"type":"customer.created","api_version":"2024-04-10"}}"#;
        let hook = StripeWebhook::from_json_bytes(input).expect("parse");
        assert_eq!(hook.to_json_bytes(), input.to_vec());
        assert_eq!(hook.kafka_key(), "acme:prod");
        assert_eq!(
            hook.payload["data"]["object"]["metadata"]["external_id"],
            json!("c-42")
        );
    }

    #[test]
    fn payload_must_be_an_object() {
        let input = br#"{"schema_version":1,"tenant_id":"acme","environment_id":"prod","event_id":"evt_1","event_type":"customer.created","livemode":false,"created":1714564800,"received_at":"2024-05-01T12:00:01Z","payload":"{}"}"#;
        assert!(StripeWebhook::from_json_bytes(input).is_err());
    }
}
