//! Which copy of an event counts, and when it bills.
//!
//! Rule kept here: an event (tenant, environment, customer, id) bills at its **first copy's**
//! timestamp, in one window, whatever its other copies were stamped. The first copy is the
//! one stored first: a copy of an event already in `event_first_seen` (kept 45 days after its
//! first copy arrived) takes the stored copy's timestamp and a version below it, so it
//! collapses into the stored copy's row and never replaces it; among the new copies of one
//! batch, the first ingested wins ([`copy_version`](crate::billing::copy_version)). Every
//! copy of an event therefore has one row key in `events_processed`, whose sorting key holds
//! the time, and a window total reads only its own window's rows.
//!
//! A batch's new events are recorded in `event_first_seen` before its rows are inserted, and
//! before the next batch is looked up: a copy in the next batch always finds them.

use std::collections::HashMap;

use time::OffsetDateTime;

use crate::billing::MeteredEvent;

/// An event's identity: tenant, environment, customer, event id.
pub type EventKey<'a> = (&'a str, &'a str, &'a str, &'a str);

/// The 8-byte hash `event_first_seen` is ordered by: SipHash-2-4 (keys 0) of tenant,
/// environment, customer and id joined by NUL (no identifier holds a control character), the
/// same as ClickHouse's `sipHash64(concat(tenant_id, '\0', environment_id, '\0', customer_id,
/// '\0', event_id))` that migration 5 stores. Fixed for ever: stored hashes depend on it.
pub fn identity_hash(key: &EventKey<'_>) -> u64 {
    use std::hash::Hasher;
    // std's SipHasher is SipHash-2-4 with keys 0 and does not change; deprecated only in
    // favour of DefaultHasher, whose algorithm may.
    #[allow(deprecated)]
    let mut hasher = std::hash::SipHasher::new();
    let (tenant, environment, customer, id) = key;
    for (i, part) in [tenant, environment, customer, id].into_iter().enumerate() {
        if i > 0 {
            hasher.write(b"\0");
        }
        hasher.write(part.as_bytes());
    }
    hasher.finish()
}

/// A map by event: hashed with foldhash, not SipHash (a batch looks up its 100,000 rows here,
/// and SipHash was a fifth of the aggregator's CPU).
pub type ByEvent<'a, V> = HashMap<EventKey<'a>, V, foldhash::fast::RandomState>;

/// The identity of the event a row belongs to.
pub fn key_of(row: &MeteredEvent) -> EventKey<'_> {
    (
        row.event.tenant_id.as_str(),
        row.event.environment_id.as_str(),
        row.event.customer_id.as_str(),
        row.event.id.as_str(),
    )
}

/// A copy of an event's stamp: when it bills and how it ranks against other copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub timestamp: OffsetDateTime,
    pub version: u64,
    pub ingested_at: OffsetDateTime,
}

impl Stamp {
    fn of(row: &MeteredEvent) -> Self {
        Self {
            timestamp: row.timestamp,
            version: row.version,
            ingested_at: row.ingested_at,
        }
    }
}

/// The first copy (highest version) of each event among `rows`.
pub fn first_in_batch<'a>(rows: impl Iterator<Item = &'a MeteredEvent>) -> ByEvent<'a, Stamp> {
    let mut first: ByEvent<'a, Stamp> = ByEvent::default();
    for row in rows {
        let copy = Stamp::of(row);
        first
            .entry(key_of(row))
            .and_modify(|f| {
                if copy.version > f.version {
                    *f = copy;
                }
            })
            .or_insert(copy);
    }
    first
}

/// What a batch does about its copies, once the stored first copies are known.
#[derive(Debug)]
pub struct Settled<'a> {
    /// Events seen for the first time, with their first copy: recorded before the batch's
    /// rows are inserted.
    pub new: Vec<(EventKey<'a>, Stamp)>,
    /// The first copy of each event among the batch's rows.
    batch: ByEvent<'a, Stamp>,
    /// Events whose first copy was stored before this batch.
    stored: ByEvent<'a, Stamp>,
}

impl<'a> Settled<'a> {
    /// The copy that bills `key`: the stored one, or the batch's first.
    fn billing(&self, key: &EventKey<'a>) -> Option<&Stamp> {
        self.stored.get(key).or_else(|| self.batch.get(key))
    }
}

/// Settles a batch's events against the first copies stored before it (`stored`, looked up
/// for the batch's keys).
pub fn settle<'a>(batch: ByEvent<'a, Stamp>, stored: ByEvent<'a, Stamp>) -> Settled<'a> {
    let new = batch
        .iter()
        .filter(|(key, _)| !stored.contains_key(*key))
        .map(|(key, first)| (*key, *first))
        .collect();
    Settled { new, batch, stored }
}

/// How a row of a copy must change to count as its event's billing copy: `Restamp` when it
/// was stamped at another time (its event is metered again at the billing time: another
/// window, perhaps another meter definition), `Demote` when it would outrank a copy stored
/// before it (a copy ingested earlier but read later, such as a dead letter replayed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fix {
    Keep,
    /// Metered again at `at`, its rows' versions no higher than `ceiling` (below the billing
    /// copy's).
    Restamp {
        at: OffsetDateTime,
        ceiling: u64,
    },
    Demote(u64),
}

/// What `row` needs under `settled`.
pub fn fix(row: &MeteredEvent, settled: &Settled<'_>) -> Fix {
    let key = key_of(row);
    let Some(billing) = settled.billing(&key) else {
        return Fix::Keep;
    };
    if row.timestamp != billing.timestamp {
        return Fix::Restamp {
            at: billing.timestamp,
            ceiling: below(billing.version),
        };
    }
    match settled.stored.get(&key) {
        Some(stored) if row.version > stored.version => Fix::Demote(below(stored.version)),
        _ => Fix::Keep,
    }
}

/// The version a copy gets when it must lose to a stored copy of version `stored`.
pub fn below(stored: u64) -> u64 {
    stored.saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use meterline_schemas::{
        CustomerId, Decimal, EnvironmentId, EventId, EventName, MeterId, RawUsageEvent, TenantId,
        Timestamp, Window,
    };
    use time::macros::datetime;

    use crate::billing::copy_version;

    fn row(id: &str, stamped: OffsetDateTime, ingested: OffsetDateTime) -> MeteredEvent {
        let event = Arc::new(RawUsageEvent {
            id: EventId::parse(id).unwrap(),
            tenant_id: TenantId::parse("t").unwrap(),
            environment_id: EnvironmentId::parse("e").unwrap(),
            customer_id: CustomerId::parse("c").unwrap(),
            event_name: EventName::parse("api.request").unwrap(),
            timestamp: Timestamp::new(stamped).unwrap(),
            properties: serde_json::Map::new(),
            source: None,
            ingested_at: None,
        });
        MeteredEvent {
            event,
            meter_id: MeterId::parse("calls").unwrap(),
            timestamp: stamped,
            quantity: Decimal::ONE,
            unique_key: String::new(),
            version: copy_version(ingested, stamped),
            ingested_at: ingested,
            expired: false,
            window: Window::containing(stamped, 60).unwrap(),
        }
    }

    #[test]
    fn a_retry_stamped_later_bills_at_the_first_copys_time_within_a_batch_and_after_it() {
        let ingested = datetime!(2026-12-07 10:00 UTC);
        let first = row("e1", datetime!(2026-12-07 09:59 UTC), ingested);
        // An SDK stamping `now` on its retry, an hour and a window later.
        let retry = row(
            "e1",
            datetime!(2026-12-07 11:00 UTC),
            ingested + time::Duration::HOUR,
        );
        let other = row("e2", datetime!(2026-12-07 10:30 UTC), ingested);

        // Both copies in one batch: the first ingested bills, the retry is restamped.
        let rows = [retry.clone(), first.clone(), other.clone()];
        let settled = settle(first_in_batch(rows.iter()), ByEvent::default());
        assert_eq!(settled.new.len(), 2);
        assert_eq!(fix(&first, &settled), Fix::Keep);
        let restamp = Fix::Restamp {
            at: first.timestamp,
            ceiling: first.version - 1,
        };
        assert_eq!(fix(&retry, &settled), restamp);
        assert_eq!(fix(&other, &settled), Fix::Keep);

        // The retry alone in a later batch: the stored first copy bills, nothing new.
        let later = [retry.clone()];
        let stored = ByEvent::from_iter([(key_of(&first), Stamp::of(&first))]);
        let settled = settle(first_in_batch(later.iter()), stored);
        assert!(settled.new.is_empty());
        assert_eq!(fix(&retry, &settled), restamp);
    }

    #[test]
    fn the_identity_hash_is_clickhouses() {
        // `SELECT sipHash64(concat('t', '\0', 'e', '\0', 'c', '\0', 'id-1'))` on ClickHouse
        // 26.7; the integration tests check it against stored rows too.
        assert_eq!(
            identity_hash(&("t", "e", "c", "id-1")),
            17_528_441_994_668_032_981
        );
        assert_ne!(
            identity_hash(&("t", "e", "c", "id-1")),
            identity_hash(&("t", "e", "ci", "d-1"))
        );
    }

    #[test]
    fn a_copy_read_after_the_stored_one_never_outranks_it() {
        let stamped = datetime!(2026-12-07 09:59 UTC);
        let ingested = datetime!(2026-12-07 10:00 UTC);
        let stored_copy = row("e1", stamped, ingested);
        // Ingested a second earlier (another ingest replica), read a batch later.
        let earlier = row("e1", stamped, ingested - time::Duration::SECOND);
        assert!(earlier.version > stored_copy.version);
        let stored = ByEvent::from_iter([(key_of(&stored_copy), Stamp::of(&stored_copy))]);
        let settled = settle(first_in_batch(std::iter::once(&earlier)), stored);
        assert_eq!(
            fix(&earlier, &settled),
            Fix::Demote(stored_copy.version - 1)
        );
        // The stored copy itself read again (a batch replayed after a crash): unchanged.
        let stored = ByEvent::from_iter([(key_of(&stored_copy), Stamp::of(&stored_copy))]);
        let settled = settle(first_in_batch(std::iter::once(&stored_copy)), stored);
        assert_eq!(fix(&stored_copy, &settled), Fix::Keep);
        assert!(settled.new.is_empty());
    }
}
