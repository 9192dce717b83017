//! A verified delivery's body as a Stripe event, and the `stripe.webhooks` message made of it
//! (pure functions).
//!
//! Rule kept here: this runs only on bytes whose signature verified, and keeps the event object
//! verbatim as the message's `payload` (member order included); only `id` and `type` are
//! required, because they are what deduplication and the consumers route on. `livemode` and
//! `created` are copied when present (v1 events carry `created` as Unix seconds, v2 thin
//! events as RFC 3339).

use meterline_schemas::{
    EnvironmentId, StripeEventId, StripeEventType, StripeWebhook, TenantId, Timestamp,
};
use serde_json::{Map, Value};

/// A Stripe event whose signature verified.
#[derive(Debug, Clone, PartialEq)]
pub struct StripeEvent {
    pub id: StripeEventId,
    pub event_type: StripeEventType,
    pub livemode: bool,
    /// Stripe's `created`, Unix seconds; the receive time when the event has none.
    pub created: i64,
    pub payload: Map<String, Value>,
}

impl StripeEvent {
    /// Parses a verified body. The error says what is wrong, for the `malformed_event` answer.
    pub fn parse(body: &[u8], received_at: Timestamp) -> Result<Self, String> {
        let payload: Map<String, Value> = serde_json::from_slice(body)
            .map_err(|e| format!("the event is not a JSON object: {e}"))?;
        let id = match payload.get("id") {
            Some(Value::String(id)) => {
                StripeEventId::parse(id).map_err(|e| format!("the event's id: {e}"))?
            }
            _ => return Err("the event has no string id".into()),
        };
        let event_type = match payload.get("type") {
            Some(Value::String(t)) => {
                StripeEventType::parse(t).map_err(|e| format!("the event's type: {e}"))?
            }
            _ => return Err("the event has no string type".into()),
        };
        let livemode = payload
            .get("livemode")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let created = match payload.get("created") {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => Timestamp::parse(s).ok().map(|t| t.unix_timestamp()),
            _ => None,
        }
        .unwrap_or_else(|| received_at.unix_timestamp());
        Ok(Self {
            id,
            event_type,
            livemode,
            created,
            payload,
        })
    }

    /// The `stripe.webhooks` message for the tenant environment whose endpoint received it.
    pub fn into_message(
        self,
        tenant_id: TenantId,
        environment_id: EnvironmentId,
        received_at: Timestamp,
    ) -> StripeWebhook {
        StripeWebhook {
            tenant_id,
            environment_id,
            event_id: self.id,
            event_type: self.event_type,
            livemode: self.livemode,
            created: self.created,
            received_at,
            payload: self.payload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        Timestamp::from_unix_timestamp(1_764_190_000).unwrap()
    }

    #[test]
    fn a_v1_event_keeps_its_payload_verbatim() {
        let body = br#"{"id":"evt_1","object":"event","type":"customer.created","livemode":true,"created":1764189999,"data":{"object":{"id":"cus_1","metadata":{"external_id":"flexprice_customer_123"}}}}"#;
        let event = StripeEvent::parse(body, now()).unwrap();
        assert_eq!(event.id.as_str(), "evt_1");
        assert_eq!(event.event_type.as_str(), "customer.created");
        assert!(event.livemode);
        assert_eq!(event.created, 1_764_189_999);
        let message = event.into_message(
            TenantId::parse("tenant_123").unwrap(),
            EnvironmentId::parse("env_prod").unwrap(),
            now(),
        );
        assert_eq!(message.kafka_key(), "tenant_123:env_prod");
        assert_eq!(serde_json::to_vec(&message.payload).unwrap(), body.to_vec());
    }

    #[test]
    fn a_thin_event_with_rfc3339_created_is_accepted() {
        let body = br#"{"id":"evt_test_1","object":"v2.core.event","type":"v1.billing.meter.error_report_triggered","created":"2025-11-26T20:00:00Z","livemode":false}"#;
        let event = StripeEvent::parse(body, now()).unwrap();
        assert_eq!(event.created, 1_764_187_200);
        assert!(!event.livemode);
    }

    #[test]
    fn missing_created_falls_back_to_receive_time() {
        let event = StripeEvent::parse(br#"{"id":"evt_1","type":"x"}"#, now()).unwrap();
        assert_eq!(event.created, now().unix_timestamp());
    }

    #[test]
    fn bodies_without_id_or_type_are_refused() {
        for body in [
            &b"not json"[..],
            b"[]",
            b"\"evt_1\"",
            br#"{"type":"customer.created"}"#,
            br#"{"id":"evt_1"}"#,
            br#"{"id":1,"type":"customer.created"}"#,
            br#"{"id":"evt_1","type":null}"#,
            br#"{"id":"","type":"customer.created"}"#,
            br#"{"id":"evt_1","type":"a\u0000b"}"#,
        ] {
            assert!(
                StripeEvent::parse(body, now()).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
