-- The sync ledger: per (tenant, environment, customer, meter, window), the latest window
-- total the aggregator published, and what Stripe has accepted for it. The sink only ever
-- sends the difference between the two, so a resync or force_rerun long after Stripe's 24 h
-- identifier window cannot bill twice.
CREATE TABLE stripe_sync_batches (
    id                   bigserial   PRIMARY KEY,
    tenant_id            text        NOT NULL,
    environment_id       text        NOT NULL,
    -- The customer (entity_type customer); named as in the original design's SQL.
    entity_id            text        NOT NULL,
    meter_id             text        NOT NULL,
    window_start         timestamptz NOT NULL,
    window_end           timestamptz NOT NULL,
    -- The latest published window total and its revision.
    aggregated_quantity  numeric     NOT NULL,
    event_count          bigint      NOT NULL,
    window_revision      integer     NOT NULL,
    -- The sum of the meter event values Stripe accepted for this window (whole numbers).
    synced_quantity      numeric     NOT NULL DEFAULT 0,
    sync_status          text        NOT NULL CHECK (sync_status IN (
        'pending', 'in_flight', 'synced', 'pending_mapping', 'skipped', 'failed', 'expired',
        'needs_reconciliation')),
    attempts             integer     NOT NULL DEFAULT 0,
    next_attempt_at      timestamptz NOT NULL DEFAULT now(),
    lease_until          timestamptz,
    -- The identifier of the last meter event Stripe accepted for this window.
    stripe_event_id      text,
    last_error           text,
    last_job_id          uuid,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    synced_at            timestamptz,
    UNIQUE (tenant_id, environment_id, entity_id, meter_id, window_start)
);

CREATE INDEX stripe_sync_batches_ready
    ON stripe_sync_batches (next_attempt_at)
    WHERE sync_status IN ('pending', 'in_flight');
CREATE INDEX stripe_sync_batches_by_status
    ON stripe_sync_batches (tenant_id, environment_id, sync_status);

-- Every meter event the sink sent or is sending: its deterministic identifier and value. A row is written BEFORE the request goes out; after a crash a
-- 'sending' row is sent again with the same identifier and value, which Stripe recognises.
CREATE TABLE stripe_sync_sends (
    batch_id       bigint      NOT NULL REFERENCES stripe_sync_batches (id) ON DELETE CASCADE,
    seq            integer     NOT NULL,
    identifier     text        NOT NULL UNIQUE,
    value          numeric     NOT NULL,
    event_name     text        NOT NULL,
    provider_customer_id text  NOT NULL,
    stripe_timestamp bigint    NOT NULL,
    -- Stripe stores a 500 under its Idempotency-Key and replays it: after a 5xx answer the
    -- next attempt needs a new key (`<identifier>-<generation>`). The identifier stays, so
    -- Stripe still recognises the event if an earlier attempt was recorded after all.
    key_generation integer     NOT NULL DEFAULT 0,
    status         text        NOT NULL CHECK (status IN ('sending', 'accepted', 'refused')),
    error          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    answered_at    timestamptz,
    PRIMARY KEY (batch_id, seq)
);

-- Manual sync requests (POST /v1/stripe/sync/manual).
CREATE TABLE sync_jobs (
    id             uuid        PRIMARY KEY,
    tenant_id      text        NOT NULL,
    environment_id text        NOT NULL,
    entity_type    text        NOT NULL,
    entity_id      text,
    meter_id       text,
    time_from      timestamptz NOT NULL,
    time_to        timestamptz NOT NULL,
    force_rerun    boolean     NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (time_from < time_to)
);
CREATE INDEX sync_jobs_by_tenant ON sync_jobs (tenant_id, environment_id, created_at DESC);
