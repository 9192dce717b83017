//! Target `ingest_event`: any bytes as the body of `POST /v1/events` (`parse_json` into
//! `EventInput`, then `accept`), and the same text as one event of a bulk request
//! (`accept_raw`, which parses each raw element on its own).
//!
//! Properties:
//! - no panic, whatever the bytes;
//! - the two paths agree: the same event accepted (ids aside when generated), or the same
//!   refusal code, since a client must not get another answer for an event by batching it;
//! - an accepted event carries the token's tenant and environment, the ingestion time, and a
//!   timestamp no further ahead than allowed;
//! - what ingest writes to `usage.raw` decodes to the same event (the aggregator's read).

use std::time::Duration;

use ingest::events::{accept, accept_raw, Accepted, EventInput};
use meterline_common::api::parse_json;
use meterline_common::auth::TenantScope;
use meterline_schemas::{EnvironmentId, RawUsageEvent, TenantId, Timestamp};

/// ingest's default `INGEST_MAX_FUTURE_SECONDS`.
const MAX_FUTURE: Duration = Duration::from_secs(300);

pub fn check(data: &[u8]) {
    let scope = TenantScope {
        tenant_id: TenantId::parse("tenant_fuzz").expect("valid tenant"),
        environment_id: EnvironmentId::parse("env_fuzz").expect("valid environment"),
        subject: None,
    };
    // A fixed clock keeps every run of an input the same.
    let now = Timestamp::parse("2026-11-26T10:00:00Z").expect("valid timestamp");

    let single = parse_json::<EventInput>(data)
        .map_err(|err| err.code)
        .and_then(|input| accept(input, &scope, now, MAX_FUTURE).map_err(|err| err.code));

    // A bulk element is valid JSON text, hence UTF-8; other bytes only reach the single path.
    if let Ok(text) = std::str::from_utf8(data) {
        let bulk = accept_raw(text, &scope, now, MAX_FUTURE, usize::MAX).map_err(|err| err.code);
        match (&single, &bulk) {
            (Ok(one), Ok(other)) => assert_eq!(comparable(one), comparable(other)),
            (Err(one), Err(other)) => assert_eq!(one, other, "refusal codes differ"),
            _ => panic!("single {single:?} and bulk {bulk:?} disagree"),
        }
    }

    let Ok(accepted) = single else { return };
    let event = &accepted.event;
    assert_eq!(event.tenant_id, scope.tenant_id);
    assert_eq!(event.environment_id, scope.environment_id);
    assert_eq!(event.ingested_at, Some(now));
    assert!(event.timestamp.as_offset_date_time() <= now.as_offset_date_time() + MAX_FUTURE);
    let bytes = event.to_json_bytes();
    let read = RawUsageEvent::from_json_bytes(&bytes).unwrap_or_else(|err| {
        panic!(
            "ingest wrote a usage.raw message the aggregator refuses ({err}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(&read, event, "usage.raw round trip changed the event");
}

/// The accepted event with a generated id blanked to the other path's, which is random.
fn comparable(accepted: &Accepted) -> (bool, RawUsageEvent) {
    let mut event = accepted.event.clone();
    if accepted.id_generated {
        event.id = meterline_schemas::EventId::parse("generated").expect("valid id");
    }
    (accepted.id_generated, event)
}
