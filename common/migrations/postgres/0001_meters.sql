-- Meter definitions: which events feed a meter and how they aggregate.
-- Scoped by (tenant_id, environment_id) like every table here: no query reads across tenants.
CREATE TABLE meters (
    tenant_id      text        NOT NULL,
    environment_id text        NOT NULL,
    id             text        NOT NULL,
    event_name     text        NOT NULL,
    aggregation    text        NOT NULL
        CHECK (aggregation IN ('COUNT', 'SUM', 'MAX', 'LATEST', 'COUNT_UNIQUE')),
    -- The event property the aggregation reads; COUNT reads none.
    property       text,
    -- Property filters, a JSON array of {"property", "in": [values]} objects.
    filters        jsonb       NOT NULL DEFAULT '[]'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, environment_id, id),
    CHECK ((aggregation = 'COUNT') = (property IS NULL))
);

-- The aggregator resolves each event to its meters by (tenant, environment, event_name).
CREATE INDEX meters_by_event_name ON meters (tenant_id, environment_id, event_name);
