-- A meter event Stripe accepted (200) and later dropped, as its asynchronous error report
-- says (`v1.billing.meter.error_report_triggered`, e.g. no such customer): `dropped`. Its units
-- are taken back out of the window's synced sums, so a retry after the cause is fixed sends
-- them once, under a new identifier. `error` holds the report's reason.
ALTER TABLE stripe_sync_sends DROP CONSTRAINT stripe_sync_sends_status_check;
ALTER TABLE stripe_sync_sends ADD CONSTRAINT stripe_sync_sends_status_check
    CHECK (status IN ('sending', 'accepted', 'refused', 'dropped'));
