-- Rows of events_processed are deleted by ClickHouse (during merges) once their event is
-- 400 days old: a year of usage stays queryable (GET /v1/usage) with a month to spare.
-- `meterline migrate` replaces this default with RETENTION_EVENTS_DAYS when it is set,
-- never below 42 days: Stripe takes meter events up to 35 days old, so a window that could
-- still be resynced keeps every row (every copy of an event shares its timestamp, so a
-- copy is never left behind to be counted alone).
ALTER TABLE events_processed MODIFY TTL toDateTime(timestamp) + INTERVAL 400 DAY
