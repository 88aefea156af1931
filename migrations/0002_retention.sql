-- Retention and compaction (progress_sse/store/retention.py).

-- One row. `horizon`: every event after it is still kept (a resume from before it is
-- answered with a reset snapshot); raised in the transaction of each deletion.
-- `expired`: the newest id deleted for its age or by count (compaction aside);
-- `compacted`: jobs finished up to this time have lost their progress events.
CREATE TABLE retention (
    k          INTEGER PRIMARY KEY CHECK (k = 1),
    horizon    INTEGER NOT NULL,
    expired    INTEGER NOT NULL,
    compacted  REAL NOT NULL
);
INSERT INTO retention SELECT 1, COALESCE(MIN(id) - 1, 0), COALESCE(MIN(id) - 1, 0), 0
    FROM events;

-- Time marks: every event up to `head` was written by `at` (written by the pruner at
-- each round). Events written before this migration count as written now.
CREATE TABLE retention_marks (
    head  INTEGER PRIMARY KEY,
    at    REAL NOT NULL
);
INSERT INTO retention_marks
    SELECT COALESCE(MAX(id), 0), (julianday('now') - 2440587.5) * 86400.0 FROM events;

CREATE INDEX retention_marks_at ON retention_marks (at);

CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
