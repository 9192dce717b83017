-- Imports of a Stripe account's existing customers (stripe-sink, stripe_sink::import): one row
-- per job, holding its cursor and its running counts, so that a job survives a crash of the
-- sink and is resumed by whichever replica claims it next. Each page of customers is applied
-- in one transaction together with the update of this row, so a resumed job neither skips nor
-- counts twice.
CREATE TABLE stripe_customer_imports (
    id               uuid        PRIMARY KEY,
    tenant_id        text        NOT NULL,
    environment_id   text        NOT NULL,
    -- The subject of the token that started the job (audit trail), when it had one.
    requested_by     text,
    status           text        NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'completed', 'failed')),
    -- Stripe's `starting_after` for the next page: the last customer of the last page applied.
    cursor           text,
    pages            integer     NOT NULL DEFAULT 0,
    customers_seen   integer     NOT NULL DEFAULT 0,
    -- Customers with an external id whose mapping the job made, or found already there.
    mapped_created   integer     NOT NULL DEFAULT 0,
    mapped_unchanged integer     NOT NULL DEFAULT 0,
    -- Customers with an external id left unmapped by the mapping rules (another customer
    -- holds it, a manual mapping stands, a newer webhook event says otherwise).
    conflicts        integer     NOT NULL DEFAULT 0,
    -- Customers without a usable external id (listed by /v1/stripe/customers/unmapped).
    unmapped         integer     NOT NULL DEFAULT 0,
    -- Earlier mappings retired because Stripe's metadata now says otherwise.
    retired          integer     NOT NULL DEFAULT 0,
    -- The first few conflicts and unmapped customers, for people reading the status.
    conflict_sample  jsonb       NOT NULL DEFAULT '[]'::jsonb,
    unmapped_sample  jsonb       NOT NULL DEFAULT '[]'::jsonb,
    -- Failed page requests (each retried), and the last failure.
    errors           integer     NOT NULL DEFAULT 0,
    last_error       text,
    -- The replica working on the job and until when; an expired lease is taken over.
    lease_owner      uuid,
    lease_until      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    CHECK ((status = 'running') = (finished_at IS NULL))
);

-- One running import per tenant environment: a second would only race the first.
CREATE UNIQUE INDEX stripe_customer_imports_one_running
    ON stripe_customer_imports (tenant_id, environment_id) WHERE status = 'running';
