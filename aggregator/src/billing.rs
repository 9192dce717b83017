//! The billing rules of aggregation, as plain functions: which meters an event feeds and with
//! what quantity, when a window is due or expired, and when a window total is (re)published.

use std::num::NonZeroU32;
use std::sync::Arc;

pub use meterline_catalog::window_totals::WindowAggregates;

/// The aggregation histories of a tenant environment's meters that changed what they count.
pub type Histories =
    std::collections::HashMap<MeterId, meterline_catalog::meter_versions::AggregationHistory>;
use meterline_schemas::stripe_limits;
use meterline_schemas::{Decimal, MeterDefinition, MeterId, QuantityError, RawUsageEvent, Window};

use time::OffsetDateTime;

/// One event's contribution to one meter: a row of `events_processed`.
#[derive(Debug, Clone, PartialEq)]
pub struct MeteredEvent {
    /// The event (tenant, environment, customer, id), shared by the rows of every meter it
    /// feeds rather than copied into each.
    pub event: Arc<RawUsageEvent>,
    pub meter_id: MeterId,
    pub timestamp: OffsetDateTime,
    pub quantity: Decimal,
    /// The distinct value for COUNT_UNIQUE meters, empty otherwise.
    pub unique_key: String,
    /// Orders copies of one event: the first copy ingested wins deduplication
    /// ([`copy_version`]).
    pub version: u64,
    pub ingested_at: OffsetDateTime,
    /// Older than Stripe accepts: stored, counted, never sendable.
    pub expired: bool,
    pub window: Window,
}

/// An event as it arrived, kept in `events_raw` for meters created later.
#[derive(Debug, Clone)]
pub struct RawEvent {
    pub event: Arc<RawUsageEvent>,
    /// Its `usage.raw` message.
    pub payload: String,
    pub ingested_at: OffsetDateTime,
}

impl RawEvent {
    /// Orders copies of one event, as for its metered rows ([`copy_version`]).
    pub fn version(&self) -> u64 {
        copy_version(self.ingested_at, self.event.timestamp.as_offset_date_time())
    }
}

/// What metering one event produced besides its rows.
#[derive(Debug, Default)]
pub struct Metering {
    /// Rows appended: one per meter the event fed.
    pub fed: usize,
    /// Meters the event matched but whose property it carried with an unusable value.
    pub failures: Vec<(MeterId, QuantityError)>,
}

/// Resolves `event` against the meters of its tenant environment and appends a row to `rows`
/// for each meter it feeds (appended rather than returned: a batch meters tens of thousands
/// of events, and a vector per event was an allocation per event). An event matching no
/// meter yields no row; an event matching a meter without the property it reads does not
/// feed that meter (`Ok(None)` from [`meterline_schemas::Aggregation::quantity`]).
///
/// A meter whose aggregation changed counts the event under the definition in force at its
/// timestamp (`histories`, [`meterline_catalog::meter_versions`]).
pub fn meter_event(
    event: &Arc<RawUsageEvent>,
    meters: &[MeterDefinition],
    histories: Option<&Histories>,
    window: Window,
    ingested_at: OffsetDateTime,
    now: OffsetDateTime,
    rows: &mut Vec<MeteredEvent>,
) -> Metering {
    let mut metering = Metering::default();
    let timestamp = event.timestamp.as_offset_date_time();
    for meter in meters
        .iter()
        .filter(|m| m.matches(&event.event_name, &event.properties))
    {
        let aggregation = match histories.and_then(|h| h.get(&meter.id)) {
            Some(history) => history.at(&meter.aggregation, timestamp).0,
            None => &meter.aggregation,
        };
        match aggregation.quantity(&event.properties) {
            Ok(Some(quantity)) => {
                rows.push(MeteredEvent {
                    event: Arc::clone(event),
                    meter_id: meter.id.clone(),
                    timestamp,
                    quantity,
                    unique_key: aggregation
                        .unique_key(&event.properties)
                        .unwrap_or_default(),
                    version: copy_version(ingested_at, timestamp),
                    ingested_at,
                    expired: stripe_limits::event_expired(timestamp, now),
                    window,
                });
                metering.fed += 1;
            }
            Ok(None) => {}
            Err(e) => metering.failures.push((meter.id.clone(), e)),
        }
    }
    metering
}

/// Bits of a version that order copies by when ingest accepted them: milliseconds since
/// 1970 fit in 43 bits until the year 2248.
const INGEST_BITS: u32 = 43;
/// Bits below them that order copies ingested in the same millisecond.
const TIE_BITS: u32 = 20;

/// The version of a copy of an event (`ReplacingMergeTree(version)` keeps the highest): the
/// **first copy ingested wins**, so an event's billing time is its first copy's timestamp. A
/// retry stamped later (an SDK putting `now` on each attempt, ingest's default timestamp)
/// collapses into the first copy's row and counts in its window, never in a second one,
/// whether or not that window was published already. Copies ingested in the same millisecond
/// (two ingest replicas) are ordered by a hash of their timestamps, so which one wins never
/// depends on the order ClickHouse merged them in.
///
/// Among copies read in one batch this decides; a copy read after its event's first copy was
/// stored is restamped and demoted below it ([`crate::first_copy`]). Rows written before this
/// rule carry the ingest millisecond itself, below every version made here; ClickHouse
/// migration 5 records them as first copies, so a later copy loses to them too.
pub fn copy_version(ingested_at: OffsetDateTime, timestamp: OffsetDateTime) -> u64 {
    const INGEST_MAX: u64 = (1 << INGEST_BITS) - 1;
    let ingested = u64::try_from(ingested_at.unix_timestamp_nanos() / 1_000_000)
        .unwrap_or(0)
        .min(INGEST_MAX);
    // The millisecond the copy is stored with, mixed (SplitMix64's finalizer: fixed, so the
    // order never changes with a library version) into the tie bits.
    let mut tie = (timestamp.unix_timestamp_nanos() / 1_000_000) as u64;
    tie = (tie ^ (tie >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    tie = (tie ^ (tie >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    tie ^= tie >> 31;
    ((INGEST_MAX - ingested) << TIE_BITS) | (tie & ((1 << TIE_BITS) - 1))
}

/// What was last published for a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub revision: u32,
    pub quantity: Option<Decimal>,
    pub event_count: Option<u64>,
}

/// Why a window goes out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The window became due, or changed after it was published.
    Due,
    /// A resync asked for it: published even when unchanged.
    Resync,
}

/// Whether to publish a window and under which revision: the first publication is revision
/// 1; a changed total takes the next revision; an unchanged one is published again only for
/// a resync, under the same revision (nothing new happened to it).
pub fn next_revision(
    published: &Published,
    quantity: Decimal,
    event_count: u64,
    trigger: Trigger,
) -> Option<NonZeroU32> {
    let changed = published.quantity.map(|q| q.normalize()) != Some(quantity.normalize())
        || published.event_count != Some(event_count);
    let revision = if published.revision == 0 || changed {
        published.revision.saturating_add(1)
    } else if trigger == Trigger::Resync {
        published.revision
    } else {
        return None;
    };
    NonZeroU32::new(revision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterline_schemas::{CustomerId, EnvironmentId, EventId, MeterInput, TenantId, Timestamp};
    use serde_json::json;
    use time::macros::datetime;

    #[test]
    fn the_first_copy_ingested_wins_and_same_millisecond_copies_order_the_same_way_every_time() {
        let at = datetime!(2026-12-07 10:00 UTC);
        let first = copy_version(at, datetime!(2026-12-07 09:59:58 UTC));
        // A retry a second later, stamped `now` by its SDK: it loses, whatever its timestamp.
        for retry_stamp in [
            datetime!(2026-12-07 10:00:01 UTC),
            datetime!(2026-12-07 09:00 UTC),
        ] {
            assert!(copy_version(at + time::Duration::SECOND, retry_stamp) < first);
        }
        assert!(copy_version(at + time::Duration::MILLISECOND, at) < first);
        // Two replicas in one millisecond: different versions, the same ones on every call.
        let a = copy_version(at, datetime!(2026-12-07 09:59:58 UTC));
        let b = copy_version(at, datetime!(2026-12-07 09:59:59 UTC));
        assert_ne!(a, b);
        assert_eq!(a, first);
        // Above the versions written before this rule (the ingest millisecond).
        let old = u64::try_from(at.unix_timestamp() * 1000).unwrap();
        assert!(copy_version(at + time::Duration::days(365 * 200), at) > old);
    }

    fn meter(value: serde_json::Value) -> MeterDefinition {
        let input: MeterInput = serde_json::from_value(value).unwrap();
        MeterDefinition::try_from(input).unwrap()
    }

    fn event(name: &str, properties: serde_json::Value, at: OffsetDateTime) -> Arc<RawUsageEvent> {
        Arc::new(RawUsageEvent {
            id: EventId::parse("e1").unwrap(),
            tenant_id: TenantId::parse("t").unwrap(),
            environment_id: EnvironmentId::parse("e").unwrap(),
            customer_id: CustomerId::parse("c").unwrap(),
            event_name: meterline_schemas::EventName::parse(name).unwrap(),
            timestamp: Timestamp::new(at).unwrap(),
            properties: properties.as_object().unwrap().clone(),
            source: None,
            ingested_at: None,
        })
    }

    #[test]
    fn an_event_feeds_every_matching_meter() {
        let at = datetime!(2026-11-26 10:15 UTC);
        let meters = vec![
            meter(json!({"id": "calls", "event_name": "api.request", "aggregation": "COUNT"})),
            meter(
                json!({"id": "bytes", "event_name": "api.request", "aggregation": "SUM",
                         "property": "bytes"}),
            ),
            meter(
                json!({"id": "eu_calls", "event_name": "api.request", "aggregation": "COUNT",
                         "filters": [{"property": "region", "in": ["eu"]}]}),
            ),
            meter(
                json!({"id": "tokens", "event_name": "llm", "aggregation": "SUM",
                         "property": "tokens"}),
            ),
        ];
        let window = Window::containing(at, 60).unwrap();
        let e = event("api.request", json!({"bytes": "12.5", "region": "us"}), at);
        let mut rows = Vec::new();
        let m = meter_event(&e, &meters, None, window, at, at, &mut rows);
        assert_eq!(m.fed, 2);
        let fed: Vec<(&str, Decimal)> = rows
            .iter()
            .map(|r| (r.meter_id.as_str(), r.quantity))
            .collect();
        assert_eq!(
            fed,
            vec![("calls", Decimal::ONE), ("bytes", Decimal::new(125, 1))]
        );
        assert!(m.failures.is_empty());
    }

    #[test]
    fn an_unusable_value_is_a_failure_for_that_meter_only() {
        let at = datetime!(2026-11-26 10:15 UTC);
        let meters = vec![
            meter(json!({"id": "calls", "event_name": "x", "aggregation": "COUNT"})),
            meter(json!({"id": "sum", "event_name": "x", "aggregation": "SUM", "property": "n"})),
        ];
        let e = event("x", json!({"n": "lots"}), at);
        let mut rows = Vec::new();
        let window = Window::containing(at, 60).unwrap();
        let m = meter_event(&e, &meters, None, window, at, at, &mut rows);
        assert_eq!((m.fed, rows.len()), (1, 1));
        assert_eq!(m.failures.len(), 1);
        assert_eq!(m.failures[0].0.as_str(), "sum");
    }

    #[test]
    fn expiry_follows_stripes_35_days() {
        let now = datetime!(2026-11-26 12:00 UTC);
        assert!(!stripe_limits::event_expired(
            now - time::Duration::days(35),
            now
        ));
        assert!(stripe_limits::event_expired(
            now - time::Duration::days(35) - time::Duration::SECOND,
            now
        ));
        let old = Window::containing(now - time::Duration::days(36), 60).unwrap();
        assert!(stripe_limits::window_expired(&old, now));
        // A window whose last second is still inside the 35 days can be sent.
        let edge = Window::containing(now - time::Duration::days(35), 60).unwrap();
        assert!(!stripe_limits::window_expired(&edge, now));
    }

    #[test]
    fn revisions() {
        let never = Published {
            revision: 0,
            quantity: None,
            event_count: None,
        };
        let q = Decimal::from(10);
        assert_eq!(
            next_revision(&never, q, 3, Trigger::Due).map(|r| r.get()),
            Some(1)
        );
        let sent = Published {
            revision: 1,
            quantity: Some(Decimal::new(100, 1)),
            event_count: Some(3),
        };
        // 10.0 == 10: unchanged, nothing to publish.
        assert_eq!(next_revision(&sent, q, 3, Trigger::Due), None);
        assert_eq!(
            next_revision(&sent, q, 3, Trigger::Resync).map(|r| r.get()),
            Some(1)
        );
        assert_eq!(
            next_revision(&sent, q + Decimal::ONE, 4, Trigger::Due).map(|r| r.get()),
            Some(2)
        );
        // Same total from different events (a duplicate replaced by a late one): republish.
        assert_eq!(
            next_revision(&sent, q, 4, Trigger::Due).map(|r| r.get()),
            Some(2)
        );
    }
}
