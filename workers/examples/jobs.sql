-- The job queue drained by workers/examples/jobs.py.  Idempotent.
CREATE TABLE IF NOT EXISTS jobs (
    id          bigserial PRIMARY KEY,
    payload     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    done_at     timestamptz,
    done_by     uuid
);
-- Only pending jobs are indexed: the queue's hot end stays small.
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (id) WHERE done_at IS NULL;
