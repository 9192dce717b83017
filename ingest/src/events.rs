//! From a request's event to a `usage.raw` message: pure functions, no I/O.
//!
//! The tenant and environment come from the token, never from the body (a body that names
//! them is refused as an unknown field). The event `id` is the client's deduplication key;
//! when absent a fresh one is generated and the answer says so, because a client that retries
//! without an id of its own cannot be deduplicated.

use std::time::Duration;

use meterline_common::api::{json_error_code, ErrorDetail};
use meterline_common::auth::TenantScope;
use meterline_schemas::{CustomerId, EventId, EventName, EventSource, RawUsageEvent, Timestamp};
use serde::Deserialize;
use serde_json::{Map, Value};

/// One event as a client sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventInput {
    pub id: Option<String>,
    pub customer_id: String,
    pub event_name: String,
    /// RFC 3339; the time of ingestion when absent.
    pub timestamp: Option<String>,
    pub properties: Option<Map<String, Value>>,
    pub source: Option<String>,
}

/// A valid event ready to be written, and whether its id was generated here.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub event: RawUsageEvent,
    pub id_generated: bool,
}

/// Why one event was refused: a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventError {
    pub code: &'static str,
    pub message: String,
}

impl EventError {
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: "invalid_value",
            message: message.into(),
        }
    }

    pub fn at(self, index: usize) -> ErrorDetail {
        ErrorDetail {
            index,
            code: self.code,
            message: self.message,
        }
    }
}

/// Validates `input` for `scope`. `now` is the ingestion time (and the default timestamp).
pub fn accept(
    input: EventInput,
    scope: &TenantScope,
    now: Timestamp,
    max_future: Duration,
) -> Result<Accepted, EventError> {
    let (id, id_generated) = match input.id {
        Some(id) => (
            EventId::parse(&id).map_err(|e| EventError::invalid(e.to_string()))?,
            false,
        ),
        None => (EventId::generate(), true),
    };
    let customer_id =
        CustomerId::parse(&input.customer_id).map_err(|e| EventError::invalid(e.to_string()))?;
    let event_name =
        EventName::parse(&input.event_name).map_err(|e| EventError::invalid(e.to_string()))?;
    let timestamp = match input.timestamp {
        Some(text) => Timestamp::parse(&text).map_err(|e| EventError::invalid(e.to_string()))?,
        None => now,
    };
    let latest = now.as_offset_date_time() + max_future;
    if timestamp.as_offset_date_time() > latest {
        return Err(EventError {
            code: "timestamp_in_future",
            message: format!(
                "timestamp {timestamp} is more than {}s ahead of the server clock",
                max_future.as_secs()
            ),
        });
    }
    let source = input
        .source
        .map(|s| EventSource::parse(&s))
        .transpose()
        .map_err(|e| EventError::invalid(e.to_string()))?;
    Ok(Accepted {
        event: RawUsageEvent {
            id,
            tenant_id: scope.tenant_id.clone(),
            environment_id: scope.environment_id.clone(),
            customer_id,
            event_name,
            timestamp,
            properties: input.properties.unwrap_or_default(),
            source,
            ingested_at: Some(now),
        },
        id_generated,
    })
}

/// Parses one event of a bulk request (its raw JSON text) and validates it.
pub fn accept_raw(
    raw: &str,
    scope: &TenantScope,
    now: Timestamp,
    max_future: Duration,
    max_bytes: usize,
) -> Result<Accepted, EventError> {
    if raw.len() > max_bytes {
        return Err(EventError {
            code: "event_too_large",
            message: format!("event over {max_bytes} bytes"),
        });
    }
    let input: EventInput = serde_json::from_str(raw).map_err(|e| EventError {
        code: json_error_code(&e),
        message: e.to_string(),
    })?;
    accept(input, scope, now, max_future)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterline_schemas::{EnvironmentId, TenantId};

    fn scope() -> TenantScope {
        TenantScope {
            tenant_id: TenantId::parse("tenant_123").unwrap(),
            environment_id: EnvironmentId::parse("env_prod").unwrap(),
            subject: None,
        }
    }

    fn now() -> Timestamp {
        Timestamp::parse("2026-11-26T12:00:00Z").unwrap()
    }

    fn run(raw: &str) -> Result<Accepted, EventError> {
        accept_raw(raw, &scope(), now(), Duration::from_secs(300), 1024)
    }

    #[test]
    fn a_full_event_is_stamped_with_the_token_scope() {
        let accepted = run(r#"{"id":"e1","customer_id":"c1","event_name":"api.call",
            "timestamp":"2026-11-26T11:59:00Z","properties":{"n":3},"source":"web"}"#)
        .unwrap();
        assert!(!accepted.id_generated);
        let e = accepted.event;
        assert_eq!(e.id.as_str(), "e1");
        assert_eq!(e.tenant_id.as_str(), "tenant_123");
        assert_eq!(e.environment_id.as_str(), "env_prod");
        assert_eq!(e.timestamp.to_string(), "2026-11-26T11:59:00Z");
        assert_eq!(e.properties["n"], 3);
        assert_eq!(e.ingested_at, Some(now()));
    }

    #[test]
    fn defaults_generate_the_id_and_take_now() {
        let accepted = run(r#"{"customer_id":"c1","event_name":"api.call"}"#).unwrap();
        assert!(accepted.id_generated);
        assert_eq!(accepted.event.timestamp, now());
        assert!(accepted.event.properties.is_empty());
    }

    #[test]
    fn refusals_have_stable_codes() {
        let cases = [
            ("{", "malformed_json"),
            (
                r#"{"customer_id":"c","event_name":"x","tenant_id":"other"}"#,
                "unknown_field",
            ),
            (r#"{"event_name":"x"}"#, "missing_field"),
            (r#"{"customer_id":7,"event_name":"x"}"#, "invalid_type"),
            (
                r#"{"customer_id":"c","event_name":"x","properties":[1]}"#,
                "invalid_type",
            ),
            (r#"{"customer_id":"","event_name":"x"}"#, "invalid_value"),
            (
                r#"{"customer_id":"c","event_name":"x","timestamp":"yesterday"}"#,
                "invalid_value",
            ),
            (
                r#"{"customer_id":"c","event_name":"x","timestamp":"2026-11-26T12:05:01Z"}"#,
                "timestamp_in_future",
            ),
        ];
        for (raw, code) in cases {
            assert_eq!(run(raw).unwrap_err().code, code, "{raw}");
        }
        let long = format!(
            r#"{{"customer_id":"c","event_name":"{}"}}"#,
            "x".repeat(2000)
        );
        assert_eq!(run(&long).unwrap_err().code, "event_too_large");
    }

    #[test]
    fn the_future_bound_is_inclusive() {
        let at_bound = r#"{"customer_id":"c","event_name":"x","timestamp":"2026-11-26T12:05:00Z"}"#;
        assert!(run(at_bound).is_ok());
    }
}
