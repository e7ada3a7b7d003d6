-- switchboard schema v5 (SQLite): messages are found by id without an index on ids.
-- New message ids carry their seq (see `ids::SeqIds`): the id index cost every insert a
-- B-tree search, a uniqueness probe and about three WAL pages per group commit.

-- Values this database keeps for itself.
CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  INTEGER NOT NULL
);
-- The key of the permutation that turns a seq into the head of a message id.
INSERT INTO meta (key, value) VALUES ('message_id_key', random());

-- Ids that do not carry their seq: every message written before this version, and those
-- whose id was fixed before the writer numbered them (inserts under an Idempotency-Key,
-- whose stored answer already holds the id).
CREATE TABLE message_ids (
    id   TEXT PRIMARY KEY,
    seq  INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO message_ids (id, seq) SELECT id, seq FROM messages;

-- Events name their message by seq as well, so the feed joins them on the primary key.
ALTER TABLE events ADD COLUMN message_seq INTEGER;
UPDATE events SET message_seq = (SELECT m.seq FROM messages m WHERE m.id = events.message_id)
WHERE message_id IS NOT NULL;

-- The table again without UNIQUE on id (its index cannot be dropped otherwise). Nothing
-- references messages, so it can be rebuilt in place.
CREATE TABLE messages_v5 (
    -- Monotonic sequence: the order of messages and the cursor for pagination and replay.
    seq                   INTEGER PRIMARY KEY,
    -- Unique: new ids by construction (they carry seq), older ones as keys of message_ids.
    id                    TEXT NOT NULL,
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
INSERT INTO messages_v5 (seq, id, account_id, conversation_id, visitor_id, type, text,
    agent_id, agent_name, agent_userpic, is_pushed, is_missed, is_missed_by_visitor,
    is_trigger, received_from, created_at, updated_at, deleted_at)
SELECT seq, id, account_id, conversation_id, visitor_id, type, text,
    agent_id, agent_name, agent_userpic, is_pushed, is_missed, is_missed_by_visitor,
    is_trigger, received_from, created_at, updated_at, deleted_at
FROM messages;
DROP TABLE messages;
ALTER TABLE messages_v5 RENAME TO messages;
CREATE INDEX messages_visitor ON messages (account_id, visitor_id, seq);
-- The account's change feed (see v2).
CREATE INDEX messages_account_seq ON messages (account_id, seq);
