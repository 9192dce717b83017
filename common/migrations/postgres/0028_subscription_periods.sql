-- Billing periods as Stripe names them (issue 15, cases 2 and 7): the current period of each
-- subscription, from `customer.subscription.created` / `.updated` / `.deleted` webhooks,
-- written by stripe-sink. A meter that bills the period to date (MAX, LATEST, COUNT_UNIQUE)
-- is aggregated over its customer's subscription period rather than the calendar month, and
-- every meter event is stamped inside the period its window is billed in.
CREATE TABLE stripe_subscription_periods (
    tenant_id            text        NOT NULL,
    environment_id       text        NOT NULL,
    subscription_id      text        NOT NULL,
    provider_customer_id text        NOT NULL,
    period_start         timestamptz NOT NULL,
    period_end           timestamptz NOT NULL CHECK (period_end > period_start),
    -- The Stripe meters (`mtr_...`) its metered prices bill: a customer with several
    -- subscriptions is billed for a meter in the one whose items name it.
    meter_ids            text[]      NOT NULL DEFAULT '{}',
    -- Stripe's `created` of the event that last set this row: deliveries are unordered, and
    -- an older event changes nothing.
    last_event_created   bigint      NOT NULL,
    -- Whether the aggregator has re-marked the customer's period-to-date windows since this
    -- row last changed; a row of a customer not mapped yet waits for its mapping.
    windows_marked       boolean     NOT NULL DEFAULT false,
    -- When Stripe finalized the invoice of this period (`invoice.finalized`): usage reported
    -- for it after then is on no invoice, so the sink reports a change instead of sending it.
    invoice_finalized_at timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, environment_id, subscription_id, period_start)
);

CREATE INDEX stripe_subscription_periods_by_customer
    ON stripe_subscription_periods (tenant_id, environment_id, provider_customer_id);
CREATE INDEX stripe_subscription_periods_unmarked
    ON stripe_subscription_periods (updated_at) WHERE NOT windows_marked;

-- The Stripe meter's id (`mtr_...`), read with its formula: what subscription items name.
ALTER TABLE stripe_meter_mappings ADD COLUMN stripe_meter_id text;

-- The end of the billing period a window is billed in, as the aggregator published it
-- (NULL from an older aggregator: the calendar month). Meter events are stamped before it.
ALTER TABLE stripe_sync_batches ADD COLUMN period_end timestamptz;
