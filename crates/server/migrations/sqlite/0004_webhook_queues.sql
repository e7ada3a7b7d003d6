-- switchboard schema v4 (SQLite): one row per (endpoint, conversation) with pending
-- deliveries, pointing at the oldest one. Claiming due deliveries reads these heads only,
-- so its cost does not grow with the backlog (it scanned every pending delivery before).
CREATE TABLE webhook_queues (
    webhook_id       TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    conversation_id  TEXT NOT NULL,
    -- event_seq of the oldest pending delivery: the only one of this queue that may go.
    head_seq         INTEGER NOT NULL,
    -- When that delivery is due.
    next_attempt_at  INTEGER NOT NULL,
    PRIMARY KEY (webhook_id, conversation_id)
);
CREATE INDEX webhook_queues_due ON webhook_queues (next_attempt_at);

INSERT INTO webhook_queues (webhook_id, conversation_id, head_seq, next_attempt_at)
SELECT d.webhook_id, d.conversation_id, d.event_seq, d.next_attempt_at
FROM webhook_deliveries d
WHERE d.status = 'pending'
  AND d.event_seq = (SELECT min(p.event_seq) FROM webhook_deliveries p
                     WHERE p.webhook_id = d.webhook_id AND p.conversation_id = d.conversation_id
                       AND p.status = 'pending');
