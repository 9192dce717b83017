-- One Stripe account's rate limit and circuit breaker, shared by every stripe-sink replica
-- (stripe-sink/src/pacing/shared.rs). Stripe limits an account, not a process: each replica
-- reserves blocks of send slots here before it sends, so together they never exceed the rate.
--
-- next_slot: the first slot nobody holds yet. A reservation of k slots at the account's
--   interval starts at greatest(next_slot, now) and moves next_slot k intervals on, in one
--   statement under the row's lock (now read once the lock is held): replicas' blocks never overlap, an idle account starts
--   afresh at now (no burst is saved up), and a replica that dies mid-block only leaves its
--   slots unused.
-- reserved_at: when a replica last reserved slots (the account was sending then).
-- open_until: the breaker is open (no request reaches Stripe) until then; set by the replica
--   whose requests failed, obeyed by all.
-- probe_until: after open_until, one replica at a time holds the half-open probe, until its
--   outcome is written or this lease runs out (a replica that died while probing).
CREATE TABLE stripe_account_pacing (
    account_id  text PRIMARY KEY,
    next_slot   timestamptz NOT NULL,
    reserved_at timestamptz NOT NULL,
    open_until  timestamptz,
    probe_until timestamptz
);
