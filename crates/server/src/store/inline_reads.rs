//! SQLite reads run on the calling thread, on synchronous connections of their own.
//!
//! sqlx's SQLite driver runs each connection on a thread of its own: a statement goes to
//! that thread over a channel and every row comes back over another, each a thread
//! wake-up. For a read of one row that hand-off cost several times the read itself. The
//! reads here run on the caller's thread instead: from SQLite's page cache they take
//! microseconds, and in WAL mode a read never waits for the writer, so they do not hold up
//! a tokio worker for longer than a handler's own work does.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::{MessageRow, StoreError, StoreResult};

/// Statements kept prepared per connection: every distinct read's SQL fits.
const STATEMENT_CACHE: usize = 32;

/// Synchronous read connections to one SQLite file, opened on demand and kept while idle.
pub(super) struct InlineReads {
    path: PathBuf,
    /// At most this many are kept idle; a connection released beyond it is closed.
    keep: usize,
    /// Idle connections, and `None` once closed.
    idle: Mutex<Option<Vec<rusqlite::Connection>>>,
}

impl InlineReads {
    /// Reads of the database at `path` (which must exist, in WAL mode), keeping up to
    /// `keep` connections open while idle.
    pub(super) fn new(path: &Path, keep: usize) -> Self {
        Self {
            path: path.to_owned(),
            keep: keep.max(1),
            idle: Mutex::new(Some(Vec::new())),
        }
    }

    /// Runs `read` on an idle connection, or on a new one when none is idle. The
    /// connection is kept for the next read only when this one succeeded (a failure may
    /// come from the connection itself).
    pub(super) fn read<T>(
        &self,
        read: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> StoreResult<T> {
        let idle = self.lock().as_mut().ok_or(StoreError::Closed)?.pop();
        let conn = match idle {
            Some(conn) => conn,
            None => self.open()?,
        };
        let value = read(&conn)?;
        if let Some(idle) = self.lock().as_mut() {
            if idle.len() < self.keep {
                idle.push(conn);
            }
        }
        Ok(value)
    }

    /// Closes the idle connections; later reads fail, and a read still running closes its
    /// connection when it ends.
    pub(super) fn close(&self) {
        let idle = self.lock().take();
        drop(idle);
    }

    /// How many connections are idle.
    #[cfg(test)]
    pub(super) fn idle_count(&self) -> usize {
        self.lock().as_ref().map_or(0, Vec::len)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<rusqlite::Connection>>> {
        // The list is consistent whatever a panicking holder did (a push or a pop).
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open(&self) -> StoreResult<rusqlite::Connection> {
        use rusqlite::OpenFlags as F;
        // Not created: the store opened (and migrated) the file before any read. SQLite's
        // default VFS even when the writer uses the WAL shim: the shim only buffers the
        // frames a connection appends, these connections never append, and locks and shared
        // memory are the default VFS's under both.
        let flags = F::SQLITE_OPEN_READ_WRITE | F::SQLITE_OPEN_NO_MUTEX | F::SQLITE_OPEN_URI;
        let conn = rusqlite::Connection::open_with_flags(&self.path, flags)?;
        // A reader waits only while another process recovers the WAL after a crash.
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "query_only", true)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }
}

/// A message from a row of [`MESSAGE_COLUMNS`](super::shared::MESSAGE_COLUMNS), by position
/// in that list.
pub(super) fn message_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageRow> {
    message_at(r, 0)
}

/// A message from the columns of [`MESSAGE_COLUMNS`](super::shared::MESSAGE_COLUMNS) that
/// start at position `at` of a row.
pub(super) fn message_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<MessageRow> {
    Ok(MessageRow {
        seq: r.get(at)?,
        id: r.get(at + 1)?,
        account_id: r.get(at + 2)?,
        conversation_id: r.get(at + 3)?,
        visitor_id: r.get(at + 4)?,
        kind: r.get(at + 5)?,
        text: r.get(at + 6)?,
        agent_id: r.get(at + 7)?,
        agent_name: r.get(at + 8)?,
        agent_userpic: r.get(at + 9)?,
        is_pushed: r.get(at + 10)?,
        is_missed: r.get(at + 11)?,
        is_missed_by_visitor: r.get(at + 12)?,
        is_trigger: r.get(at + 13)?,
        received_from: r.get(at + 14)?,
        created_at: r.get(at + 15)?,
        updated_at: r.get(at + 16)?,
        deleted_at: r.get(at + 17)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database() -> (tempfile::TempDir, PathBuf, rusqlite::Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let writer = rusqlite::Connection::open(&path).unwrap();
        writer
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (v INTEGER);")
            .unwrap();
        (dir, path, writer)
    }

    fn sum(reads: &InlineReads) -> StoreResult<i64> {
        reads.read(|c| {
            c.prepare_cached("SELECT coalesce(sum(v), 0) FROM t")?
                .query_row([], |r| r.get(0))
        })
    }

    #[test]
    fn reads_see_commits_and_reuse_connections_that_succeeded() {
        let (_dir, path, writer) = database();
        let reads = InlineReads::new(&path, 1);
        assert_eq!(sum(&reads).unwrap(), 0);
        assert_eq!(reads.idle_count(), 1);
        writer.execute("INSERT INTO t VALUES (5)", []).unwrap();
        assert_eq!(
            sum(&reads).unwrap(),
            5,
            "a kept connection reads the newest commit"
        );
        assert_eq!(reads.idle_count(), 1);

        // A read that fails does not give its connection back.
        let failed = reads.read(|c| c.query_row("SELECT nope FROM t", [], |r| r.get::<_, i64>(0)));
        assert!(matches!(failed, Err(StoreError::Read(_))), "{failed:?}");
        assert_eq!(reads.idle_count(), 0);

        // None beyond `keep` is kept: a read inside a read opens a second connection.
        let nested = reads.read(|_| Ok(sum(&reads))).unwrap().unwrap();
        assert_eq!(nested, 5);
        assert_eq!(reads.idle_count(), 1);
    }

    #[test]
    fn reads_cannot_write() {
        let (_dir, path, _writer) = database();
        let reads = InlineReads::new(&path, 1);
        let wrote = reads.read(|c| c.execute("INSERT INTO t VALUES (1)", []));
        assert!(matches!(wrote, Err(StoreError::Read(_))), "{wrote:?}");
    }

    #[test]
    fn close_ends_reads_and_their_connections() {
        let (_dir, path, _writer) = database();
        let reads = InlineReads::new(&path, 2);
        // A read running while the store closes: its connection is not kept after it.
        let during = reads.read(|_| {
            reads.close();
            Ok(1)
        });
        assert_eq!(during.unwrap(), 1);
        assert_eq!(reads.idle_count(), 0);
        assert!(matches!(sum(&reads), Err(StoreError::Closed)));
    }
}
