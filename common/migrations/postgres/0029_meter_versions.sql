-- Meter versions (issue 15, case 11): what a meter counted before a change of its
-- aggregation or property, and until when. The `meters` row holds the newest definition; a
-- window counts under the definition in force at its start, an event under the one in force
-- at its timestamp, so a change never recomputes (and re-bills) a window counted before it.
CREATE TABLE meter_versions (
    tenant_id      text        NOT NULL,
    environment_id text        NOT NULL,
    meter_id       text        NOT NULL,
    aggregation    text        NOT NULL
        CHECK (aggregation IN ('COUNT', 'SUM', 'MAX', 'LATEST', 'COUNT_UNIQUE')),
    property       text,
    -- Exclusive; a window boundary at least INGEST_MAX_FUTURE_SECONDS plus a minute after
    -- the change was made.
    until          timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, environment_id, meter_id, until),
    CHECK ((aggregation = 'COUNT') = (property IS NULL))
);
