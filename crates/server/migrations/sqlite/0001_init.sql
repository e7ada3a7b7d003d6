-- switchboard schema v1 (SQLite). Never edit an applied migration; add a new one.
-- Times are milliseconds since the Unix epoch. Every row that belongs to an account
-- carries account_id, and every query filters on it.

CREATE TABLE accounts (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    is_default  INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);
-- At most one default account, even when the CLI and the server start at once.
CREATE UNIQUE INDEX accounts_one_default ON accounts (is_default) WHERE is_default = 1;

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    -- SHA-256 of the key, hex. The key itself is never stored.
    key_hash    TEXT NOT NULL UNIQUE,
    -- The first characters of the key, to recognise it in listings.
    prefix      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE groups (
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    UNIQUE (account_id, name)
);

CREATE TABLE agents (
    id            TEXT PRIMARY KEY,
    account_id    TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    email         TEXT,
    -- Lower-cased email, for case-insensitive lookups and uniqueness.
    email_key     TEXT,
    userpic       TEXT,
    -- Created on the fly from agentEmail + agentName (Brevo's "dummy agent").
    is_dummy      INTEGER NOT NULL DEFAULT 0,
    -- Presence: online while online_until is in the future (agentOnlinePing).
    online_until  INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    UNIQUE (account_id, email_key)
);
CREATE INDEX agents_account ON agents (account_id, online_until);

CREATE TABLE group_members (
    group_id    TEXT NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    agent_id    TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    account_id  TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, agent_id)
);
CREATE INDEX group_members_agent ON group_members (agent_id);

CREATE TABLE visitors (
    account_id        TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    id                TEXT NOT NULL,
    group_id          TEXT REFERENCES groups (id) ON DELETE SET NULL,
    name              TEXT,
    email             TEXT,
    browser_language  TEXT,
    start_page_url    TEXT,
    start_page_title  TEXT,
    -- JSON object of attributes a widget or integration sent.
    attributes        TEXT NOT NULL DEFAULT '{}',
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    PRIMARY KEY (account_id, id)
);

-- One continuous conversation per visitor (Brevo's conversationId).
CREATE TABLE conversations (
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    visitor_id  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    UNIQUE (account_id, visitor_id),
    FOREIGN KEY (account_id, visitor_id) REFERENCES visitors (account_id, id) ON DELETE CASCADE
);

CREATE TABLE messages (
    -- Monotonic sequence: the order of messages and the cursor for pagination and replay.
    seq                   INTEGER PRIMARY KEY,
    id                    TEXT NOT NULL UNIQUE,
    account_id            TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    conversation_id       TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    visitor_id            TEXT NOT NULL,
    type                  TEXT NOT NULL CHECK (type IN ('agent', 'visitor')),
    text                  TEXT NOT NULL,
    -- Snapshot of the sender as the visitor saw it when the message was written.
    agent_id              TEXT,
    agent_name            TEXT,
    agent_userpic         TEXT,
    is_pushed             INTEGER NOT NULL DEFAULT 0,
    is_missed             INTEGER NOT NULL DEFAULT 0,
    is_missed_by_visitor  INTEGER NOT NULL DEFAULT 0,
    is_trigger            INTEGER NOT NULL DEFAULT 0,
    received_from         TEXT,
    created_at            INTEGER NOT NULL,
    updated_at            INTEGER NOT NULL,
    -- Deleted messages stay as tombstones so streams can tell clients about the deletion.
    deleted_at            INTEGER
);
CREATE INDEX messages_visitor ON messages (account_id, visitor_id, seq);

-- Idempotency-Key extension: the first answer to a POST, replayed for 24 hours.
CREATE TABLE idempotency_keys (
    account_id   TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    key          TEXT NOT NULL,
    -- SHA-256 of method, path and canonical JSON body.
    fingerprint  TEXT NOT NULL,
    status       INTEGER NOT NULL,
    body         TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (account_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
