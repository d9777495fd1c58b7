-- API keys: only the SHA-256 of a key is kept; the key itself is shown once.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT,
    key_hash    TEXT NOT NULL UNIQUE,
    admin       INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

-- One row per sandbox. `state` drives crash recovery: a row left in
-- 'creating', 'restoring' or 'deleting' is finished or undone at start-up.
CREATE TABLE sandboxes (
    id                    TEXT PRIMARY KEY,
    owner_key_id          TEXT NOT NULL REFERENCES api_keys(id),
    name                  TEXT NOT NULL,
    image                 TEXT NOT NULL,
    runtime               TEXT NOT NULL,
    state                 TEXT NOT NULL,
    pending_restore       TEXT,
    container_id          TEXT,
    rootfs_path           TEXT,
    env                   TEXT NOT NULL,
    labels                TEXT NOT NULL,
    forked_from_vm        TEXT,
    forked_from_snapshot  TEXT,
    created_at            TEXT NOT NULL,
    UNIQUE (owner_key_id, name)
);

CREATE TABLE snapshots (
    sandbox_id  TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, name)
);
