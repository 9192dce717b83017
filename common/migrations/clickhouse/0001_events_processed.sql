-- Billable quantities, one row per (event, meter) the event feeds.
--
-- Deduplication: the sorting key ends in event_id, so every copy of one event for one meter
-- (a client retry, a Kafka redelivery after a crash, a replay) collapses into one row under
-- ReplacingMergeTree(version). Merges run in the background, so every total is read with
-- FINAL (or an argMax over event_id): never from a view that sums on insert, which would count
-- the copies before they are merged away.
--
-- No PARTITION BY on the event time: ReplacingMergeTree only deduplicates inside one
-- partition, and a copy of an event must never escape deduplication by landing in another one.
CREATE TABLE IF NOT EXISTS events_processed
(
    tenant_id      LowCardinality(String),
    environment_id LowCardinality(String),
    customer_id    String,
    meter_id       LowCardinality(String),
    event_id       String,
    timestamp      DateTime64(3, 'UTC'),
    qty_billable   Decimal(38, 9),
    sign           Int8,
    version        UInt64,
    ingested_at    DateTime64(3, 'UTC'),
    expired        UInt8 DEFAULT 0
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, environment_id, customer_id, meter_id, event_id)
