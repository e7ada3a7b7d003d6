-- switchboard schema v2 (PostgreSQL): the visitor side, live streams and chat lifecycle.

ALTER TABLE accounts ADD COLUMN widget_id TEXT;
ALTER TABLE accounts ADD COLUMN identity_key TEXT;
CREATE UNIQUE INDEX accounts_widget ON accounts (widget_id);

ALTER TABLE visitors ADD COLUMN page_url TEXT;
ALTER TABLE visitors ADD COLUMN page_title TEXT;

ALTER TABLE conversations ADD COLUMN visitor_read_seq BIGINT NOT NULL DEFAULT 0;

CREATE INDEX messages_account_seq ON messages (account_id, seq);

CREATE TABLE events (
    seq              BIGINT PRIMARY KEY,
    account_id       TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    conversation_id  TEXT NOT NULL,
    visitor_id       TEXT NOT NULL,
    kind             TEXT NOT NULL,
    message_id       TEXT,
    chat_id          TEXT,
    created_at       BIGINT NOT NULL
);
CREATE INDEX events_visitor ON events (account_id, visitor_id, seq);
CREATE INDEX events_account ON events (account_id, seq);

CREATE TABLE chats (
    id                 TEXT PRIMARY KEY,
    account_id         TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    conversation_id    TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    visitor_id         TEXT NOT NULL,
    start_seq          BIGINT NOT NULL,
    started_at         BIGINT NOT NULL,
    no_agent_online    BOOLEAN NOT NULL DEFAULT false,
    start_page_url     TEXT,
    start_page_title   TEXT,
    ended_at           BIGINT,
    end_seq            BIGINT
);
CREATE UNIQUE INDEX chats_one_open ON chats (conversation_id) WHERE ended_at IS NULL;

-- The feed position: one row, locked by every write transaction (so transactions commit
-- in seq order and a reader that sees seq n sees everything below it) and naming the
-- instance that wrote last (an instance whose in-memory chat state is older reloads it).
CREATE TABLE feed_head (
    only_row  BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    seq       BIGINT NOT NULL,
    writer    TEXT NOT NULL
);
INSERT INTO feed_head (seq, writer) VALUES (0, '');

-- RFC 7396 JSON merge patch, as SQLite's json_patch: visitor attributes are merged with it.
CREATE FUNCTION sb_merge_patch(target jsonb, patch jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF patch IS NULL OR jsonb_typeof(patch) <> 'object' THEN
        RETURN patch;
    END IF;
    IF target IS NULL OR jsonb_typeof(target) <> 'object' THEN
        target := '{}'::jsonb;
    END IF;
    RETURN (
        SELECT coalesce(jsonb_object_agg(key, value), '{}'::jsonb) FROM (
            SELECT key,
                   CASE WHEN p.value IS NULL THEN t.value
                        ELSE sb_merge_patch(t.value, p.value) END AS value
            FROM jsonb_each(target) t FULL JOIN jsonb_each(patch) p USING (key)
        ) merged
        WHERE value IS NOT NULL AND value <> 'null'::jsonb
    );
END
$$;
