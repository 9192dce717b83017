-- The sink's claim (stripe-sink/src/ledger.rs, `Ledger::claim`) leaves out every window whose
-- (tenant, environment, customer, meter) has another window under a live lease. Without this
-- index that check read the whole (tenant, environment, status) index once per claim, a cost
-- that grew with every window the ledger keeps; with it, the check reads the in-flight rows
-- only, as many as dispatchers hold. (The due rows themselves are read in `next_attempt_at`
-- order from `stripe_sync_batches_ready`, the first LIMIT of them, never all that are due.)
CREATE INDEX stripe_sync_batches_leased
    ON stripe_sync_batches (tenant_id, environment_id, entity_id, meter_id)
    WHERE sync_status = 'in_flight';
