-- A customer import (POST /v1/stripe/migrate/customers) also reads the account's existing
-- subscriptions (GET /v1/subscriptions?status=all) once its customers are done, so billing
-- periods that began before the webhook endpoint existed are known at once (issue 15, case
-- 2: periods "fetched", not only from customer.subscription.* webhooks).
ALTER TABLE stripe_customer_imports
    ADD COLUMN customers_done       boolean NOT NULL DEFAULT false,
    -- Stripe's `starting_after` for the next page of subscriptions.
    ADD COLUMN subscriptions_cursor text,
    ADD COLUMN subscription_pages   integer NOT NULL DEFAULT 0,
    -- Subscription periods recorded (new or changed) by the job.
    ADD COLUMN subscription_periods integer NOT NULL DEFAULT 0;
