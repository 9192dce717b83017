-- Every batch of a backlog marks the same thousands of window rows again. Leaving a third of
-- each page free lets such an update put the new row version on the same page without new
-- index entries (a HOT update: no indexed column changes), instead of a new entry in the
-- five-column primary key and the due index per row per batch. Applies to pages written
-- from now on; `VACUUM FULL aggregation_windows` rewrites the existing ones.
ALTER TABLE aggregation_windows SET (fillfactor = 65);
