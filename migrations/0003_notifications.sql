-- The notification outbox (progress_sse/notify/outbox.py): one row per channel of a
-- job's `finished` (or asked-for stall) event, inserted in the same transaction as
-- the event, so a delivery survives any crash after the commit. `claimed_until`:
-- the deliverer's lease on a row while it sends it.
CREATE TABLE notifications (
    id               INTEGER PRIMARY KEY,
    event_id         INTEGER NOT NULL,
    job_id           TEXT NOT NULL,
    channel          TEXT NOT NULL,
    target           TEXT NOT NULL,
    body             TEXT NOT NULL,
    created_at       REAL NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending',
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,
    claimed_until    REAL NOT NULL DEFAULT 0,
    last_error       TEXT,
    finished_at      REAL
);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE status = 'pending';
CREATE INDEX notifications_job ON notifications (job_id, id);
-- delivered and failed rows go once they are older than the retention (delivery.py)
CREATE INDEX notifications_done ON notifications (finished_at) WHERE status <> 'pending';
