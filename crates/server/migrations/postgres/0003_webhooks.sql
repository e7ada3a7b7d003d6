-- switchboard schema v3 (PostgreSQL): webhook endpoints, the outbox and its delivery log.

CREATE TABLE webhooks (
    id                    TEXT PRIMARY KEY,
    account_id            TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    url                   TEXT NOT NULL,
    events                TEXT NOT NULL,
    description           TEXT,
    enabled               BOOLEAN NOT NULL DEFAULT true,
    secret                TEXT NOT NULL,
    created_at            BIGINT NOT NULL,
    consecutive_failures  BIGINT NOT NULL DEFAULT 0,
    failing_since         BIGINT,
    last_error            TEXT
);
CREATE INDEX webhooks_account ON webhooks (account_id);

CREATE TABLE webhook_events (
    id               TEXT PRIMARY KEY,
    seq              BIGINT NOT NULL UNIQUE,
    account_id       TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    conversation_id  TEXT NOT NULL,
    visitor_id       TEXT NOT NULL,
    kind             TEXT NOT NULL,
    chat_id          TEXT NOT NULL,
    from_seq         BIGINT NOT NULL,
    to_seq           BIGINT NOT NULL,
    payload          TEXT,
    created_at       BIGINT NOT NULL
);

CREATE TABLE webhook_deliveries (
    webhook_id       TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id         TEXT NOT NULL REFERENCES webhook_events (id) ON DELETE CASCADE,
    account_id       TEXT NOT NULL,
    conversation_id  TEXT NOT NULL,
    event_seq        BIGINT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending',
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,
    created_at       BIGINT NOT NULL,
    last_attempt_at  BIGINT,
    last_status      BIGINT,
    last_error       TEXT,
    last_latency_ms  BIGINT,
    delivered_at     BIGINT,
    PRIMARY KEY (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_order
    ON webhook_deliveries (webhook_id, conversation_id, event_seq) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (webhook_id, event_seq);

CREATE TABLE webhook_attempts (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id   TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id     TEXT NOT NULL,
    attempt      BIGINT NOT NULL,
    at           BIGINT NOT NULL,
    status_code  BIGINT,
    latency_ms   BIGINT NOT NULL,
    error        TEXT
);
CREATE INDEX webhook_attempts_event ON webhook_attempts (webhook_id, event_id, attempt);

ALTER TABLE chats ADD COLUMN fragment_seq BIGINT NOT NULL DEFAULT 0;
