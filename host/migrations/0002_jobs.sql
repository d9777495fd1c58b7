-- Snapshot export and import jobs. A job left 'queued' or 'running' by a
-- stopped host is marked 'failed' at the next start, and its multipart upload
-- (upload_id) is aborted.
CREATE TABLE jobs (
    id            TEXT PRIMARY KEY,
    owner_key_id  TEXT NOT NULL REFERENCES api_keys(id),
    kind          TEXT NOT NULL,
    state         TEXT NOT NULL,
    vm            TEXT NOT NULL,
    snapshot      TEXT,
    sandbox_id    TEXT,
    object_key    TEXT,
    upload_key    TEXT,
    upload_id     TEXT,
    manifest      TEXT,
    bytes_done    INTEGER NOT NULL DEFAULT 0,
    bytes_total   INTEGER,
    error         TEXT,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);

CREATE INDEX jobs_exports ON jobs (sandbox_id, kind, state);
