-- The first copy of every event, kept 45 days after it arrived (Stripe's 35 days for
-- back-dated meter events plus a margin): the timestamp an event id bills at. The aggregator
-- looks a batch's event ids up here before it stores them, and gives every later copy the
-- first copy's timestamp, so all copies of one event share one row key in events_processed
-- (whose sorting key holds the time: a window total reads only its window's rows) and count
-- in exactly one window, however they were stamped.
--
-- One row per event: only first copies are written (a replayed batch writes the same rows
-- again, collapsed under ReplacingMergeTree). Point lookups of thousands of random ids per
-- batch: small granules and a bloom filter on the id, so a lookup reads the granules that hold
-- its ids, not the customer's whole 45 days.
CREATE TABLE IF NOT EXISTS event_first_seen
(
    tenant_id      LowCardinality(String),
    environment_id LowCardinality(String),
    customer_id    String,
    event_id       String,
    timestamp      DateTime64(3, 'UTC'),
    version        UInt64,
    ingested_at    DateTime64(3, 'UTC'),
    INDEX event_id_bloom event_id TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, environment_id, customer_id, event_id)
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
