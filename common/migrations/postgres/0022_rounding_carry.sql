-- Stripe bills whole numbers; window totals can be fractional. Rounding each window on its
-- own drifts without bound (0.4 an hour bills 0 for ever, 0.5 an hour bills twice the usage),
-- so the sink rounds the running total of each customer and meter instead and carries the
-- rest: every run of meter events then adds up to within 1 of the exact usage it covers.

-- The exact quantity of the window that its accepted meter events account for. A window is
-- settled when this equals aggregated_quantity; synced_quantity stays the whole numbers
-- Stripe accepted for it. Windows settled before this migration counted exactly what they
-- sent.
ALTER TABLE stripe_sync_batches ADD COLUMN accounted_quantity numeric NOT NULL DEFAULT 0;
UPDATE stripe_sync_batches SET accounted_quantity = synced_quantity;

-- The exact change of the window total a meter event accounts for (its value is that change
-- plus the carry, rounded). Events written before this migration accounted for their value.
ALTER TABLE stripe_sync_sends ADD COLUMN accounted numeric;
UPDATE stripe_sync_sends SET accounted = value;
ALTER TABLE stripe_sync_sends ALTER COLUMN accounted SET NOT NULL;

-- Per customer and meter: the exact quantity accounted for minus the whole numbers Stripe
-- accepted, over every window (within half a unit after each send). Kept apart from the
-- windows, so pruning old ledger rows does not lose the fraction they carried.
CREATE TABLE stripe_sync_carry (
    tenant_id      text        NOT NULL,
    environment_id text        NOT NULL,
    entity_id      text        NOT NULL,
    meter_id       text        NOT NULL,
    carry          numeric     NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, environment_id, entity_id, meter_id)
);
