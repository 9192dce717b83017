-- Non-additive meters (MAX, LATEST, COUNT_UNIQUE) go to Stripe meters with the `last` formula.
-- The Stripe meter's default_aggregation.formula, read when the mapping is made (or before the
-- first send of a meter that needs `last`); NULL while it has not been read.
ALTER TABLE stripe_meter_mappings
    ADD COLUMN formula text CHECK (formula IN ('sum', 'count', 'last'));

-- How an accepted send counts: 'sum' adds its value to the window's synced sum (a change of the
-- window total); 'last' replaces it (the window's period-to-date value, which Stripe's `last`
-- formula bills when it is the period's last event).
ALTER TABLE stripe_sync_sends
    ADD COLUMN formula text NOT NULL DEFAULT 'sum' CHECK (formula IN ('sum', 'last'));
