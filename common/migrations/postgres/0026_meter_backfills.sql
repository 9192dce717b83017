-- Usage that arrived before its meter: a meter created, or one whose event name or filters
-- changed, picks up the matching events of the past 35 days from ClickHouse's events_raw,
-- once (events the meter already has are left alone). One row per such change, written in the
-- same transaction as the meter; the aggregator works through it in slices of time.
CREATE TABLE meter_backfills (
    id             bigserial   PRIMARY KEY,
    tenant_id      text        NOT NULL,
    environment_id text        NOT NULL,
    meter_id       text        NOT NULL,
    -- 'created' or 'matching_changed'.
    reason         text        NOT NULL CHECK (reason IN ('created', 'matching_changed')),
    -- The events searched: timestamps in [from_ts, until_ts).
    from_ts        timestamptz NOT NULL,
    until_ts       timestamptz NOT NULL,
    -- Progress, in the order events are looked at (timestamp, then event id): every event
    -- before (done_until, done_after_id) has been.
    done_until     timestamptz NOT NULL,
    done_after_id  text        NOT NULL DEFAULT '',
    status         text        NOT NULL DEFAULT 'pending'
                               CHECK (status IN ('pending', 'running', 'done')),
    -- Events the backfill gave the meter, and matching events whose property the meter could
    -- not use (a value that is no quantity); each counted once, whatever was redone.
    events_found   bigint      NOT NULL DEFAULT 0,
    events_unusable bigint     NOT NULL DEFAULT 0,
    -- Not started before this: a batch the aggregator resolved just before the change is in
    -- ClickHouse by then.
    not_before     timestamptz NOT NULL,
    lease_until    timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);

CREATE INDEX meter_backfills_open ON meter_backfills (not_before) WHERE status <> 'done';
CREATE INDEX meter_backfills_meter ON meter_backfills (tenant_id, environment_id, meter_id, id);
