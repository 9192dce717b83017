-- Retention (common/src/retention.rs): completed ledger rows older than the configured age are
-- pruned in small batches. This index finds them without scanning the live rows; its
-- predicate is the set of states pruning may touch (nothing is ever sent for them again once
-- their window is past Stripe's 35 days), so the rows still being worked on stay out of it.
CREATE INDEX stripe_sync_batches_prunable
    ON stripe_sync_batches (window_end)
    WHERE sync_status IN ('synced', 'skipped', 'expired');
