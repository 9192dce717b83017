-- Window sizes per tenant and environment, as a history: a size applies to events whose
-- timestamp is at or after its effective_from. A change takes effect at an instant aligned to
-- both the old and the new size, so windows of the two sizes never overlap (an overlap would
-- bill the same usage twice). No row: the default size (60 minutes).
CREATE TABLE aggregation_window_sizes (
    tenant_id      text        NOT NULL,
    environment_id text        NOT NULL,
    effective_from timestamptz NOT NULL,
    window_minutes integer     NOT NULL CHECK (window_minutes BETWEEN 1 AND 1440),
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, environment_id, effective_from)
);

-- Every (customer, meter, window) that has usage, and what was last published for it.
-- The aggregator marks a window dirty when events for it were written to ClickHouse, and
-- publishes dirty windows once due (window_end + grace). Publication locks rows with
-- FOR UPDATE SKIP LOCKED, so several aggregator replicas never publish one window at once and
-- its revisions only go up.
CREATE TABLE aggregation_windows (
    tenant_id             text        NOT NULL,
    environment_id        text        NOT NULL,
    customer_id           text        NOT NULL,
    meter_id              text        NOT NULL,
    window_start          timestamptz NOT NULL,
    window_end            timestamptz NOT NULL,
    due_at                timestamptz NOT NULL,
    dirty                 boolean     NOT NULL DEFAULT true,
    -- The last published revision; 0 until the first publication.
    revision              integer     NOT NULL DEFAULT 0,
    published_quantity    numeric,
    published_event_count bigint,
    published_at          timestamptz,
    first_event_at        timestamptz NOT NULL DEFAULT now(),
    last_event_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, environment_id, customer_id, meter_id, window_start),
    CHECK (window_start < window_end)
);

CREATE INDEX aggregation_windows_due ON aggregation_windows (due_at) WHERE dirty;
