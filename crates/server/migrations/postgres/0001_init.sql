-- switchboard schema v1 (PostgreSQL); the same tables as migrations/sqlite, version by
-- version. Never edit an applied migration; add a new one.
-- Times are milliseconds since the Unix epoch. Every row that belongs to an account
-- carries account_id, and every query filters on it.

CREATE TABLE accounts (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    is_default  BOOLEAN NOT NULL DEFAULT false,
    created_at  BIGINT NOT NULL
);
-- At most one default account, even when several instances start at once.
CREATE UNIQUE INDEX accounts_one_default ON accounts (is_default) WHERE is_default;

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    -- SHA-256 of the key, hex. The key itself is never stored.
    key_hash    TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE groups (
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    UNIQUE (account_id, name)
);

CREATE TABLE agents (
    id            TEXT PRIMARY KEY,
    account_id    TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    email         TEXT,
    email_key     TEXT,
    userpic       TEXT,
    is_dummy      BOOLEAN NOT NULL DEFAULT false,
    online_until  BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL,
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
    attributes        TEXT NOT NULL DEFAULT '{}',
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    PRIMARY KEY (account_id, id)
);

CREATE TABLE conversations (
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    visitor_id  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    UNIQUE (account_id, visitor_id),
    FOREIGN KEY (account_id, visitor_id) REFERENCES visitors (account_id, id) ON DELETE CASCADE
);

CREATE TABLE messages (
    seq                   BIGINT PRIMARY KEY,
    id                    TEXT NOT NULL UNIQUE,
    account_id            TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    conversation_id       TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    visitor_id            TEXT NOT NULL,
    type                  TEXT NOT NULL CHECK (type IN ('agent', 'visitor')),
    text                  TEXT NOT NULL,
    agent_id              TEXT,
    agent_name            TEXT,
    agent_userpic         TEXT,
    is_pushed             BOOLEAN NOT NULL DEFAULT false,
    is_missed             BOOLEAN NOT NULL DEFAULT false,
    is_missed_by_visitor  BOOLEAN NOT NULL DEFAULT false,
    is_trigger            BOOLEAN NOT NULL DEFAULT false,
    received_from         TEXT,
    created_at            BIGINT NOT NULL,
    updated_at            BIGINT NOT NULL,
    deleted_at            BIGINT
);
CREATE INDEX messages_visitor ON messages (account_id, visitor_id, seq);

CREATE TABLE idempotency_keys (
    account_id   TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    key          TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    status       BIGINT NOT NULL,
    body         TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (account_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
