-- The webhook relay's deduplication log: each Stripe event relayed to stripe.webhooks, per
-- tenant environment. A row is written only after Kafka acknowledged the event, so a crash in
-- between can only cause a redelivery to be published again, never a loss.
CREATE TABLE webhook_deliveries (
    tenant_id      text        NOT NULL,
    environment_id text        NOT NULL,
    event_id       text        NOT NULL,
    event_type     text        NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, environment_id, event_id)
);

-- Stripe redelivers for up to 3 days; rows far older than that can be pruned by age.
CREATE INDEX webhook_deliveries_received_at ON webhook_deliveries (received_at);
