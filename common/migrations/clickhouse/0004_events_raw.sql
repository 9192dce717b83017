-- Every usage event as it arrived, whether or not a meter took it, for 36 days: Stripe takes
-- meter events up to 35 days old, so a meter created (or a filter changed) later can still
-- bill that much usage from here (the aggregator's meter backfill), once.
--
-- `payload` is the event's usage.raw message, re-metered with the same code as the live
-- pipeline. Deduplication as in events_processed: every copy of one event collapses under
-- ReplacingMergeTree(version), read with FINAL; no PARTITION BY, for the same reason.
CREATE TABLE IF NOT EXISTS events_raw
(
    tenant_id      LowCardinality(String),
    environment_id LowCardinality(String),
    event_name     LowCardinality(String),
    customer_id    String,
    event_id       String,
    timestamp      DateTime64(3, 'UTC'),
    ingested_at    DateTime64(3, 'UTC'),
    version        UInt64,
    payload        String CODEC(ZSTD(3))
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, environment_id, event_name, customer_id, event_id)
TTL toDateTime(timestamp) + INTERVAL 36 DAY
