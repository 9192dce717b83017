-- Each tenant environment's Stripe connection. Secrets are stored only encrypted
-- (common::crypto: `v1:<key_id>:<base64>`), bound to the tenant, environment and purpose;
-- what a response may show of the key (its prefix and last four characters) is kept apart.
CREATE TABLE stripe_configs (
    tenant_id                  text        NOT NULL,
    environment_id             text        NOT NULL,
    api_key_encrypted          text        NOT NULL CHECK (api_key_encrypted LIKE 'v1:%'),
    api_key_prefix             text        NOT NULL,
    api_key_last4              text        NOT NULL,
    livemode                   boolean     NOT NULL,
    -- A JSON array of whsec_ secrets, encrypted as one value; several while a secret rolls.
    webhook_secrets_encrypted  text        NOT NULL CHECK (webhook_secrets_encrypted LIKE 'v1:%'),
    sync_enabled               boolean     NOT NULL DEFAULT true,
    aggregation_window_minutes integer     NOT NULL DEFAULT 60
        CHECK (aggregation_window_minutes BETWEEN 5 AND 60),
    -- Meter event requests per second to Stripe; NULL: Stripe's documented default for the
    -- key's mode (test 25, live 1000).
    rate_limit_per_second      integer     CHECK (rate_limit_per_second BETWEEN 1 AND 10000),
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, environment_id)
);
