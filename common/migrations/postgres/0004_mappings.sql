-- Customer and meter mappings between meterline and Stripe, and Stripe's meter error reports.
-- Written only by stripe-sink (stripe_sink::mappings); every query is scoped by
-- (tenant_id, environment_id).

-- Which provider object an entity of ours is, per provider. History is kept: a mapping is
-- retired, never deleted, so at most one row per entity (and per provider object) is active.
-- The original demo's SQL reads (provider_type, entity_type, entity_id, provider_entity_id).
CREATE TABLE entity_integration_mappings (
    id                 bigserial   PRIMARY KEY,
    tenant_id          text        NOT NULL,
    environment_id     text        NOT NULL,
    -- Widen these checks in a later migration when another entity or provider is mapped.
    entity_type        text        NOT NULL CHECK (entity_type IN ('customer')),
    entity_id          text        NOT NULL,
    provider_type      text        NOT NULL CHECK (provider_type IN ('stripe')),
    provider_entity_id text        NOT NULL,
    status             text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'retired')),
    source             text        NOT NULL CHECK (source IN ('webhook', 'manual', 'import')),
    -- The Stripe event that last set this row (webhook mappings), and its `created` (Unix
    -- seconds): webhook deliveries are unordered, so an older event must not undo a newer one.
    last_event_id      text,
    last_event_created bigint,
    -- What the provider said about the object (email, name), for people reading the list.
    metadata           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    retired_at         timestamptz,
    CHECK ((status = 'retired') = (retired_at IS NOT NULL))
);

CREATE UNIQUE INDEX entity_integration_mappings_active_entity
    ON entity_integration_mappings (tenant_id, environment_id, provider_type, entity_type, entity_id)
    WHERE status = 'active';
CREATE UNIQUE INDEX entity_integration_mappings_active_provider_entity
    ON entity_integration_mappings
       (tenant_id, environment_id, provider_type, entity_type, provider_entity_id)
    WHERE status = 'active';
-- Listing (paged by id) and the history of one entity.
CREATE INDEX entity_integration_mappings_by_scope
    ON entity_integration_mappings (tenant_id, environment_id, provider_type, entity_type, id);
CREATE INDEX entity_integration_mappings_by_entity
    ON entity_integration_mappings (tenant_id, environment_id, entity_id);

-- The newest customer.* event applied per Stripe customer: what the webhook consumer compares
-- a delivery against (deliveries are at-least-once and unordered). Customer mappings made from
-- webhooks are a function of these rows: an external id maps to the live customer whose newest
-- event carried it, the newest such event winning.
CREATE TABLE stripe_customer_states (
    tenant_id            text        NOT NULL,
    environment_id       text        NOT NULL,
    provider_customer_id text        NOT NULL,
    -- `metadata.external_id` of the newest event; NULL when it had none (or an invalid one).
    external_id          text,
    deleted              boolean     NOT NULL,
    last_event_id        text        NOT NULL,
    last_event_created   bigint      NOT NULL,
    -- Tie-break inside one second: created 0 < updated 1 < deleted 2, then the event id.
    last_event_rank      smallint    NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, environment_id, provider_customer_id)
);

CREATE INDEX stripe_customer_states_by_external_id
    ON stripe_customer_states (tenant_id, environment_id, external_id)
    WHERE external_id IS NOT NULL AND NOT deleted;

-- Stripe customers that carry no usable `metadata.external_id`: listed for an operator, who
-- adds the metadata in Stripe or maps them by hand. Status follows the newest event.
CREATE TABLE stripe_unmapped_customers (
    tenant_id            text        NOT NULL,
    environment_id       text        NOT NULL,
    provider_customer_id text        NOT NULL,
    email                text,
    name                 text,
    -- 'missing_external_id' or 'invalid_external_id'.
    reason               text        NOT NULL,
    last_event_id        text        NOT NULL,
    last_event_created   bigint      NOT NULL,
    status               text        NOT NULL DEFAULT 'unmapped'
        CHECK (status IN ('unmapped', 'mapped', 'deleted')),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, environment_id, provider_customer_id)
);

-- Which Stripe meter (by its event_name) a meter of ours is sent to.
CREATE TABLE stripe_meter_mappings (
    tenant_id         text        NOT NULL,
    environment_id    text        NOT NULL,
    meter_id          text        NOT NULL,
    provider_type     text        NOT NULL DEFAULT 'stripe' CHECK (provider_type = 'stripe'),
    -- The Stripe meter's event_name (Stripe's limit: 100 characters).
    provider_meter_id text        NOT NULL
        CHECK (char_length(provider_meter_id) BETWEEN 1 AND 100),
    sync_enabled      boolean     NOT NULL DEFAULT true,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, environment_id, meter_id)
);

-- Two meters sending to one Stripe meter would mix their usage: refused.
CREATE UNIQUE INDEX stripe_meter_mappings_provider_meter
    ON stripe_meter_mappings (tenant_id, environment_id, provider_type, provider_meter_id);

-- Stripe's asynchronous meter event errors (thin events v1.billing.meter.error_report_triggered
-- and v1.billing.meter.no_meter_found): one row per sample error, keyed by the meter event's
-- identifier; '' when the report names none (a thin event whose details were not fetched).
CREATE TABLE stripe_meter_error_reports (
    tenant_id            text        NOT NULL,
    environment_id       text        NOT NULL,
    stripe_event_id      text        NOT NULL,
    event_type           text        NOT NULL,
    error_code           text,
    error_message        text,
    meter_event_name     text,
    -- The Stripe meter (mtr_...) of the thin event's related_object, when it names one.
    stripe_meter_id      text,
    provider_customer_id text,
    identifier           text        NOT NULL DEFAULT '',
    occurred_at          timestamptz NOT NULL,
    raw                  jsonb       NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, environment_id, stripe_event_id, identifier)
);

CREATE INDEX stripe_meter_error_reports_by_identifier
    ON stripe_meter_error_reports (tenant_id, environment_id, identifier)
    WHERE identifier <> '';
