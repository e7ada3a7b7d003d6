-- switchboard schema v2 (SQLite): the visitor side, live streams and chat lifecycle.

-- Public widget id and the secret that signs visitor tokens and identity hashes.
ALTER TABLE accounts ADD COLUMN widget_id TEXT;
ALTER TABLE accounts ADD COLUMN identity_key TEXT;
UPDATE accounts SET widget_id = lower(hex(randomblob(12))),
                    identity_key = lower(hex(randomblob(32)));
CREATE UNIQUE INDEX accounts_widget ON accounts (widget_id);

-- The page the visitor is on now (start_page_* keeps the first one seen).
ALTER TABLE visitors ADD COLUMN page_url TEXT;
ALTER TABLE visitors ADD COLUMN page_title TEXT;

-- The last agent message the visitor has read (a message seq; 0 = none).
ALTER TABLE conversations ADD COLUMN visitor_read_seq INTEGER NOT NULL DEFAULT 0;

-- The account's change feed is the union of messages (their creation, by seq) and events
-- (everything else); both take their seq from one counter, so the union is one ordered log.
CREATE INDEX messages_account_seq ON messages (account_id, seq);

CREATE TABLE events (
    seq              INTEGER PRIMARY KEY,
    account_id       TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    conversation_id  TEXT NOT NULL,
    visitor_id       TEXT NOT NULL,
    -- messageUpdated | messageDeleted | conversationStarted | conversationEnded
    kind             TEXT NOT NULL,
    message_id       TEXT,
    chat_id          TEXT,
    created_at       INTEGER NOT NULL
);
CREATE INDEX events_visitor ON events (account_id, visitor_id, seq);
CREATE INDEX events_account ON events (account_id, seq);

-- A chat: a stretch of one conversation from its first (not pushed) message until it has
-- been inactive for the configured timeout. Its last activity is not stored: it is the
-- newest not-pushed message from start_seq on (the writer keeps it in memory).
CREATE TABLE chats (
    id                 TEXT PRIMARY KEY,
    account_id         TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    conversation_id    TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    visitor_id         TEXT NOT NULL,
    -- seq of the message that started it; the chat holds the messages from here on.
    start_seq          INTEGER NOT NULL,
    started_at         INTEGER NOT NULL,
    no_agent_online    INTEGER NOT NULL DEFAULT 0,
    start_page_url     TEXT,
    start_page_title   TEXT,
    ended_at           INTEGER,
    end_seq            INTEGER
);
CREATE UNIQUE INDEX chats_one_open ON chats (conversation_id) WHERE ended_at IS NULL;
