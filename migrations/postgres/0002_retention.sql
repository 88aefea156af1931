-- Retention and compaction (progress_sse/store/retention.py, postgres_retention.py).

-- One row. `horizon`: every event after it is still kept (a resume from before it is
-- answered with a reset snapshot); raised in the transaction of each deletion.
-- `expired`: the newest id deleted for its age or by count (compaction aside);
-- `compacted`: jobs finished up to this time have lost their progress events.
CREATE TABLE retention (
    k          integer PRIMARY KEY CHECK (k = 1),
    horizon    bigint NOT NULL,
    expired    bigint NOT NULL,
    compacted  double precision NOT NULL
);
INSERT INTO retention
    SELECT 1, COALESCE(min(id) - 1, 0), COALESCE(min(id) - 1, 0), 0 FROM events;

-- Time marks: every event up to `head` was written by `at` (the database's clock),
-- written by the instance that prunes. Events older than this migration count as
-- written now.
CREATE TABLE retention_marks (
    head  bigint PRIMARY KEY,
    at    double precision NOT NULL
);
INSERT INTO retention_marks SELECT head, extract(epoch FROM now()) FROM event_head;

CREATE INDEX retention_marks_at ON retention_marks (at);

CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
