-- Jobs: filterable columns plus the full public document the last event carried.
CREATE TABLE jobs (
    id            TEXT PRIMARY KEY,
    owner         TEXT NOT NULL,
    kind          TEXT NOT NULL,
    queue         TEXT NOT NULL,
    status        TEXT NOT NULL,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    finished_at   REAL,
    last_post_at  REAL,
    heartbeat_timeout_s REAL NOT NULL,
    stalled       INTEGER NOT NULL DEFAULT 0,
    token_hash    TEXT NOT NULL,
    doc           TEXT NOT NULL
);
CREATE INDEX jobs_owner_created ON jobs (owner, created_at);
CREATE INDEX jobs_status ON jobs (status);
CREATE INDEX jobs_kind_finished ON jobs (kind, finished_at);
CREATE INDEX jobs_queue_status ON jobs (queue, status, created_at);

-- Events: the log. `body` is the exact JSON a stream's data: line carries.
CREATE TABLE events (
    id       INTEGER PRIMARY KEY,
    job_id   TEXT NOT NULL,
    owner    TEXT NOT NULL,
    kind     TEXT NOT NULL,
    type     TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    seq      INTEGER,
    body     TEXT NOT NULL
);
CREATE INDEX events_job ON events (job_id, id);
CREATE UNIQUE INDEX events_job_seq ON events (job_id, attempt, seq) WHERE seq IS NOT NULL;
