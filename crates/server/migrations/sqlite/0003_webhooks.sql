-- switchboard schema v3 (SQLite): webhook endpoints, the outbox and its delivery log.

CREATE TABLE webhooks (
    id                    TEXT PRIMARY KEY,
    account_id            TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    url                   TEXT NOT NULL,
    -- Comma-separated event names: conversationStarted,conversationFragment,conversationTranscript
    events                TEXT NOT NULL,
    description           TEXT,
    enabled               INTEGER NOT NULL DEFAULT 1,
    -- Signs each delivery (HMAC-SHA256); shown when the endpoint is created.
    secret                TEXT NOT NULL,
    created_at            INTEGER NOT NULL,
    consecutive_failures  INTEGER NOT NULL DEFAULT 0,
    failing_since         INTEGER,
    last_error            TEXT
);
CREATE INDEX webhooks_account ON webhooks (account_id);

-- The outbox: one row per webhook event, written in the transaction of its cause. The
-- payload is rendered at the first attempt and then kept, so retries and replays send the
-- same bytes.
CREATE TABLE webhook_events (
    id               TEXT PRIMARY KEY,
    seq              INTEGER NOT NULL UNIQUE,
    account_id       TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    conversation_id  TEXT NOT NULL,
    visitor_id       TEXT NOT NULL,
    kind             TEXT NOT NULL,
    chat_id          TEXT NOT NULL,
    -- The messages it carries: seq in (from_seq, to_seq].
    from_seq         INTEGER NOT NULL,
    to_seq           INTEGER NOT NULL,
    payload          TEXT,
    created_at       INTEGER NOT NULL
);

-- One row per (endpoint, event): its state and schedule.
CREATE TABLE webhook_deliveries (
    webhook_id       TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id         TEXT NOT NULL REFERENCES webhook_events (id) ON DELETE CASCADE,
    account_id       TEXT NOT NULL,
    conversation_id  TEXT NOT NULL,
    event_seq        INTEGER NOT NULL,
    -- pending | delivered | failed
    status           TEXT NOT NULL DEFAULT 'pending',
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    last_attempt_at  INTEGER,
    last_status      INTEGER,
    last_error       TEXT,
    last_latency_ms  INTEGER,
    delivered_at     INTEGER,
    PRIMARY KEY (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_order
    ON webhook_deliveries (webhook_id, conversation_id, event_seq) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (webhook_id, event_seq);

CREATE TABLE webhook_attempts (
    id           INTEGER PRIMARY KEY,
    webhook_id   TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id     TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    at           INTEGER NOT NULL,
    status_code  INTEGER,
    latency_ms   INTEGER NOT NULL,
    error        TEXT
);
CREATE INDEX webhook_attempts_event ON webhook_attempts (webhook_id, event_id, attempt);

-- Messages of a chat up to this seq were sent in a fragment.
ALTER TABLE chats ADD COLUMN fragment_seq INTEGER NOT NULL DEFAULT 0;
