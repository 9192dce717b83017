//! The usage events of a benchmark: generated once, in memory, before any clock starts.
//!
//! They look like what SaaS producers send (API calls, LLM tokens, storage and compute usage,
//! a few properties each, timestamps within the last hour) and are spread over `customers`
//! customers, so that keys fan out over every partition as in production. A fixed seed makes
//! two runs send the same shapes (ids are fresh UUIDs, as a producer's would be).

use bytes::Bytes;
use meterline_common::auth::TenantScope;
use meterline_schemas::{CustomerId, EventId, EventName, OffsetDateTime, RawUsageEvent, Timestamp};
use serde_json::{json, Map, Value};

use crate::rng::SplitMix64;

/// The tenant and environment every benchmark event belongs to.
pub const TENANT: &str = "bench_tenant";
pub const ENVIRONMENT: &str = "env_bench";

/// The events, and the same events as bulk request bodies of `batch` events each.
pub struct Workload {
    pub events: Vec<RawUsageEvent>,
    pub batch: usize,
    /// `{"events": [...]}` bodies, one per `events.chunks(batch)`.
    pub bodies: Vec<Bytes>,
}

impl Workload {
    pub fn generate(
        count: usize,
        customers: usize,
        batch: usize,
        scope: &TenantScope,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            count > 0 && customers > 0 && batch > 0,
            "counts must be positive"
        );
        let mut rng = SplitMix64::new(0x6d65_7465_726c_696e);
        let now = OffsetDateTime::now_utc();
        let mut events = Vec::with_capacity(count);
        for _ in 0..count {
            let customer = CustomerId::parse(&format!("cust_{:06}", rng.below(customers as u64)))?;
            let (name, properties) = usage(&mut rng);
            let age = time::Duration::milliseconds(rng.below(3_600_000) as i64);
            events.push(RawUsageEvent {
                id: EventId::generate(),
                tenant_id: scope.tenant_id.clone(),
                environment_id: scope.environment_id.clone(),
                customer_id: customer,
                event_name: EventName::parse(name)?,
                timestamp: Timestamp::new(now - age)?,
                properties,
                source: None,
                // ingest stamps this on every event; the baseline writes it too so that both
                // write messages of the same size.
                ingested_at: Some(Timestamp::now()),
            });
        }
        let bodies = events.chunks(batch).map(bulk_body).collect();
        Ok(Self {
            events,
            batch,
            bodies,
        })
    }

    pub fn batches(&self) -> impl Iterator<Item = &[RawUsageEvent]> {
        self.events.chunks(self.batch)
    }

    pub fn batch_count(&self) -> usize {
        self.bodies.len()
    }

    /// The events of batch `index` (the last one may be shorter).
    pub fn batch_events(&self, index: usize) -> &[RawUsageEvent] {
        let start = index * self.batch;
        &self.events[start..(start + self.batch).min(self.events.len())]
    }

    pub fn body_bytes(&self) -> usize {
        self.bodies.iter().map(Bytes::len).sum()
    }
}

/// The request body a producer would POST to `/v1/events/bulk` for `events`.
fn bulk_body(events: &[RawUsageEvent]) -> Bytes {
    let events: Vec<Value> = events
        .iter()
        .map(|e| {
            json!({
                "id": e.id.as_str(),
                "customer_id": e.customer_id.as_str(),
                "event_name": e.event_name.as_str(),
                "timestamp": e.timestamp.to_string(),
                "properties": e.properties,
            })
        })
        .collect();
    Bytes::from(serde_json::to_vec(&json!({ "events": events })).expect("json values serialize"))
}

/// One event's name and properties, in the mix a metered API product sees.
fn usage(rng: &mut SplitMix64) -> (&'static str, Map<String, Value>) {
    const REGIONS: [&str; 4] = ["eu-west-1", "us-east-1", "us-west-2", "ap-southeast-1"];
    let region = REGIONS[rng.below(4) as usize];
    let (name, value) = match rng.below(100) {
        0..=59 => (
            "api.request",
            json!({
                "method": if rng.below(4) == 0 { "POST" } else { "GET" },
                "path": format!("/v1/items/{}", rng.below(10_000)),
                "status": 200,
                "duration_ms": rng.below(900) + 3,
                "region": region,
            }),
        ),
        60..=84 => (
            "llm.tokens",
            json!({
                "model": if rng.below(3) == 0 { "large-2" } else { "small-3" },
                "input_tokens": rng.below(4000) + 10,
                "output_tokens": rng.below(1000) + 1,
                "region": region,
            }),
        ),
        85..=94 => (
            "storage.gb_hours",
            json!({
                "bucket": format!("bucket-{}", rng.below(50)),
                "gb_hours": format!("{}.{:03}", rng.below(40), rng.below(1000)),
                "region": region,
            }),
        ),
        _ => (
            "compute.seconds",
            json!({
                "instance": "c6.large",
                "seconds": rng.below(3600) + 1,
                "region": region,
            }),
        ),
    };
    (name, object(value))
}

/// The map of a `json!` object literal.
pub(crate) fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!("json! of an object literal is an object"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_cover_every_event_in_batches() {
        let scope = meterline_tests::api::scope(TENANT, ENVIRONMENT);
        let w = Workload::generate(2501, 10, 1000, &scope).unwrap();
        assert_eq!(w.events.len(), 2501);
        assert_eq!(w.batch_count(), 3);
        assert_eq!(w.batch_events(2).len(), 501);
        let body: Value = serde_json::from_slice(&w.bodies[2]).unwrap();
        let first = &body["events"][0];
        assert_eq!(first["id"], w.events[2000].id.as_str());
        assert!(Timestamp::parse(first["timestamp"].as_str().unwrap()).is_ok());
        assert_eq!(w.batches().count(), 3);
    }
}
