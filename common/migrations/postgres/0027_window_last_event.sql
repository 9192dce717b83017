-- The timestamp of the latest event in a window's total (usage.windows `last_event_at`): meter
-- events are stamped no later than it, so a window's usage is not moved towards the next
-- billing period. NULL for totals from an aggregator that did not send it (stamped at the
-- window's last second, as before).
ALTER TABLE stripe_sync_batches ADD COLUMN last_event_at timestamptz;
