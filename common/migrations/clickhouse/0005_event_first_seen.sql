-- The first copy of every event, kept 45 days after it arrived (Stripe's 35 days for
-- back-dated meter events plus a margin): the timestamp an event id bills at. The aggregator
-- looks a batch's event ids up here before it stores them, and gives every later copy the
-- first copy's timestamp, so all copies of one event share one row key in events_processed
-- (whose sorting key holds the time: a window total reads only its window's rows) and count
-- in exactly one window, however they were stamped.
--
-- One row per event: only first copies are written (a replayed batch writes the same rows
-- again, collapsed under ReplacingMergeTree). A batch looks up thousands of random ids at
-- once, which no sorting of the ids keeps to a few granules: the table is ordered by an 8-byte
-- hash of the event's identity (SipHash-2-4 of tenant, environment, customer and id joined by
-- NUL, which no identifier holds; the aggregator computes the same), so a lookup sends 8 bytes
-- an event, reads at most the hash column (in granules of 1,024 when a batch is small) and the
-- other columns only where a hash matches; the exact identity is compared by the aggregator.
CREATE TABLE IF NOT EXISTS event_first_seen
(
    tenant_id      LowCardinality(String),
    environment_id LowCardinality(String),
    customer_id    String,
    event_id       String,
    timestamp      DateTime64(3, 'UTC'),
    version        UInt64,
    ingested_at    DateTime64(3, 'UTC'),
    id_hash        UInt64 MATERIALIZED sipHash64(concat(tenant_id, '\0', environment_id, '\0', customer_id, '\0', event_id))
)
ENGINE = ReplacingMergeTree(version)
ORDER BY id_hash
TTL toDateTime(ingested_at) + INTERVAL 45 DAY
SETTINGS index_granularity = 1024;

-- The events already stored: each one's winning copy (what FINAL shows, one row per meter it
-- feeds, collapsing here), when it arrived in the last 45 days. FINAL merges in a stream, so
-- this needs no memory per event however large the table. `meterline migrate
-- --relayout-events` runs this statement again with the aggregator stopped, for the events an
-- older aggregator stored after this ran.
INSERT INTO event_first_seen
SELECT tenant_id, environment_id, customer_id, event_id, timestamp, version, ingested_at
FROM events_processed FINAL
WHERE ingested_at >= now64(3) - INTERVAL 45 DAY
