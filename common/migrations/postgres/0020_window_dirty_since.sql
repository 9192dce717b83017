-- When a window last went from clean to dirty. A due window that keeps receiving events (a
-- backlog being replayed) is published once its events pause, but a change never waits more
-- than a minute from the later of this and the window's due time: the publisher's bound on
-- staleness, measured from the first unpublished change rather than from the last
-- publication (which re-sent every overdue window right after the first batch of a backlog).
-- (Numbered 0020: 0007-0019 were reserved for work done at the same time.)
ALTER TABLE aggregation_windows ADD COLUMN dirty_since timestamptz NOT NULL DEFAULT now();
