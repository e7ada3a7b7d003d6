-- switchboard schema v4 (PostgreSQL): one row per (endpoint, conversation) with pending
-- deliveries, pointing at the oldest one. With several instances a dispatcher claims a
-- queue head for a lease (claimed_until); an instance that dies loses its claims when the
-- lease runs out, and another instance delivers them.
CREATE TABLE webhook_queues (
    webhook_id       TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    conversation_id  TEXT NOT NULL,
    head_seq         BIGINT NOT NULL,
    next_attempt_at  BIGINT NOT NULL,
    claimed_until    BIGINT NOT NULL DEFAULT 0,
    -- The instance that holds the claim (released at once when it stops cleanly).
    claimed_by       TEXT,
    PRIMARY KEY (webhook_id, conversation_id)
);
CREATE INDEX webhook_queues_due ON webhook_queues (next_attempt_at);
