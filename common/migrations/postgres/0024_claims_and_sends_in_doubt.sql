-- Every claim of a window takes the next claim number; every ledger write of a dispatcher names
-- the claim it holds and changes nothing once another dispatcher claimed the window (its lease
-- ran out meanwhile). A late worker can then never send or account the same change twice.
ALTER TABLE stripe_sync_batches
    ADD COLUMN claim bigint NOT NULL DEFAULT 0;

-- Since when Stripe may hold this meter event: the first attempt that got no answer, a 409
-- (its first request still running) or a 5xx (Stripe calls the outcome indeterminate). NULL
-- while every attempt was answered with a certain "not recorded" (429, 400, 401, 403) or none
-- went out (breaker open). A later refusal of a send in doubt does not free its units for a new
-- send, and only a send in doubt for 23 h (Stripe forgets identifiers after 24 h) needs a person.
ALTER TABLE stripe_sync_sends
    ADD COLUMN in_doubt_since timestamptz;

-- Sends outstanding from before this migration: nothing says how their attempts went.
UPDATE stripe_sync_sends SET in_doubt_since = created_at WHERE status = 'sending';
