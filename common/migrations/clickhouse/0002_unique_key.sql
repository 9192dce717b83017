-- COUNT_UNIQUE meters count distinct values of a property: the canonical text of that value,
-- empty for every other aggregation.
ALTER TABLE events_processed ADD COLUMN IF NOT EXISTS unique_key String DEFAULT ''
