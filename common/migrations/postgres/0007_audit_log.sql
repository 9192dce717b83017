-- The audit trail of each tenant environment: every change to its Stripe configuration, its
-- customer and meter mappings and the encryption of its stored secrets (key rotation), and
-- every decryption of its Stripe API key. Written only through meterline_common::audit, from
-- typed changes that cannot hold a secret; rows are appended, never updated or deleted.
CREATE TABLE audit_log (
    id             bigserial   PRIMARY KEY,
    tenant_id      text        NOT NULL,
    environment_id text        NOT NULL,
    occurred_at    timestamptz NOT NULL DEFAULT now(),
    -- Who: a control API request (with the token's subject, when it had one), a Stripe
    -- webhook event, a customer import job, the sink's sync, or an operator command.
    actor_kind     text        NOT NULL
        CHECK (actor_kind IN ('api', 'webhook', 'import', 'sync', 'operator')),
    actor_subject  text,
    -- The webhook event id, import job id or command the change came through.
    actor_ref      text,
    -- What: 'stripe_config.put', 'api_key.decrypted', 'encryption_keys.rotated',
    -- 'customer_mapping.created', 'customer_mapping.retired', 'meter_mapping.created',
    -- 'meter_mapping.deleted'.
    action         text        NOT NULL,
    -- The customer or meter id the change is about, when there is one.
    target         text,
    details        jsonb       NOT NULL DEFAULT '{}'::jsonb
);

-- Reading newest first, paged by id, per tenant environment.
CREATE INDEX audit_log_by_scope ON audit_log (tenant_id, environment_id, id);
