//! Connections for reads, kept outside sqlx's pool (both backends).

use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use sqlx::error::BoxDynError;
use sqlx::{ConnectOptions, Connection, Database, Either, Execute, Executor};

/// The connections that serve reads, without sqlx's pool: the pool pings a connection
/// before handing it out and again when it comes back, two round trips (to PostgreSQL, or
/// to the thread of an SQLite connection) around a read that takes one. Here a connection
/// goes back to the idle list only after a statement that completed, and a statement that
/// fails on an idle connection found dead (PostgreSQL restarted, or ended it) is run again,
/// on the next idle connection or a new one. So only reads go through it (an
/// [`Executor`]): they are safe to repeat.
pub(super) struct ReadConnections<DB: Database> {
    connect: <DB::Connection as Connection>::Options,
    connect_timeout: Duration,
    idle: std::sync::Mutex<Vec<DB::Connection>>,
    permits: tokio::sync::Semaphore,
    size: u32,
}

impl<DB: Database> ReadConnections<DB> {
    pub(super) fn new(
        connect: <DB::Connection as Connection>::Options,
        size: u32,
        connect_timeout: Duration,
    ) -> Self {
        let size = size.max(1);
        Self {
            connect,
            connect_timeout,
            idle: std::sync::Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(size as usize),
            size,
        }
    }

    /// How many connections are idle, waiting for a read.
    #[cfg(test)]
    pub(super) fn idle_count(&self) -> usize {
        self.idle.lock().map(|idle| idle.len()).unwrap_or(0)
    }

    /// Most connections open at once.
    pub(super) fn size(&self) -> u32 {
        self.size
    }

    /// A connection for one read: an idle one, or a new one when none is idle. Waits while
    /// all are in use.
    pub(super) async fn acquire(&self) -> Result<ReadConn<'_, DB>, sqlx::Error> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let (conn, reused) = match idle {
            Some(conn) => (conn, true),
            None => {
                let conn = tokio::time::timeout(self.connect_timeout, self.connect.connect())
                    .await
                    .map_err(|_| sqlx::Error::PoolTimedOut)??;
                (conn, false)
            }
        };
        Ok(ReadConn {
            conn,
            reused,
            reads: self,
            _permit: permit,
        })
    }

    /// Closes the idle connections (a read still running closes its own when dropped).
    pub(super) async fn close(&self) {
        self.permits.close();
        let idle = self.idle.lock().map(|mut idle| std::mem::take(&mut *idle));
        for conn in idle.unwrap_or_default() {
            let _ = conn.close().await;
        }
    }
}

/// A connection of [`ReadConnections`], closed when dropped unless [`ReadConn::release`]d after a
/// read that completed (a dropped read may have left it mid-protocol).
pub(super) struct ReadConn<'a, DB: Database> {
    pub(super) conn: DB::Connection,
    /// It was idle before: it may have died meanwhile, unlike a new one.
    pub(super) reused: bool,
    reads: &'a ReadConnections<DB>,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl<DB: Database> ReadConn<'_, DB> {
    /// Back to the idle list.
    pub(super) fn release(self) {
        if let Ok(mut idle) = self.reads.idle.lock() {
            idle.push(self.conn);
        }
    }

    /// What became of a statement run on this connection: `Some` to answer it (after a
    /// success the connection goes back to the idle list; after a failure it is closed, as
    /// the statement may have left it mid-protocol), `None` to run the statement again on
    /// another connection because this one, idle until now, was found dead.
    fn settle<T>(self, result: Result<T, sqlx::Error>) -> Option<Result<T, sqlx::Error>> {
        match result {
            Ok(value) => {
                self.release();
                Some(Ok(value))
            }
            Err(e) if self.reused && connection_lost(&e) => {
                tracing::debug!(error = %e, "a read connection was lost; reading again");
                None
            }
            Err(e) => Some(Err(e)),
        }
    }
}

/// Runs `$run` (an expression using the connection `$conn`, awaited here) on a connection
/// of `$reads`, and again on another while the one it ran on turns out to have died idle.
/// Ends after at most as many tries as there were idle connections: a new connection's
/// failure is answered.
macro_rules! on_read_connection {
    ($reads:expr, |$conn:ident| $run:expr) => {
        loop {
            let mut lent = $reads.acquire().await?;
            let result = {
                let $conn = &mut lent.conn;
                $run.await
            };
            if let Some(done) = lent.settle(result) {
                break done;
            }
        }
    };
}

/// A query's SQL and arguments, run again on another connection when the first was found
/// dead: the arguments are taken out of the query once and cloned for each try.
struct Again<'q, DB: Database> {
    sql: &'q str,
    arguments: Option<DB::Arguments<'q>>,
    persistent: bool,
}

impl<'q, DB: Database> Again<'q, DB>
where
    DB::Arguments<'q>: Clone,
{
    fn from<E: Execute<'q, DB>>(mut query: E) -> Result<Self, sqlx::Error> {
        Ok(Self {
            sql: query.sql(),
            arguments: query.take_arguments().map_err(sqlx::Error::Encode)?,
            persistent: query.persistent(),
        })
    }

    fn again(&self) -> Self {
        Self {
            sql: self.sql,
            arguments: self.arguments.clone(),
            persistent: self.persistent,
        }
    }
}

impl<'q, DB: Database> Execute<'q, DB> for Again<'q, DB> {
    fn sql(&self) -> &'q str {
        self.sql
    }

    fn statement(&self) -> Option<&DB::Statement<'q>> {
        None
    }

    fn take_arguments(&mut self) -> Result<Option<DB::Arguments<'q>>, BoxDynError> {
        Ok(self.arguments.take())
    }

    fn persistent(&self) -> bool {
        self.persistent
    }
}

impl<'c, DB: Database> Executor<'c> for &'c ReadConnections<DB>
where
    for<'e> &'e mut DB::Connection: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: Clone,
{
    type Database = DB;

    // The rows are collected before the first is handed out, so that a statement that
    // fails on a dead connection can run again without having answered anything yet. The
    // reads here are all bounded (single rows and pages).
    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<DB::QueryResult, DB::Row>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, DB>,
    {
        let query = Again::from(query);
        futures::stream::once(async move {
            let query = query?;
            on_read_connection!(self, |conn| conn
                .fetch_many(query.again())
                .try_collect::<Vec<_>>())
        })
        .map_ok(|steps| futures::stream::iter(steps.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<DB::Row>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, DB>,
    {
        let query = Again::from(query);
        Box::pin(async move {
            let query = query?;
            on_read_connection!(self, |conn| conn.fetch_optional(query.again()))
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [DB::TypeInfo],
    ) -> BoxFuture<'e, Result<DB::Statement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        Box::pin(
            async move { on_read_connection!(self, |conn| conn.prepare_with(sql, parameters)) },
        )
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, Result<sqlx::Describe<DB>, sqlx::Error>>
    where
        'c: 'e,
    {
        Box::pin(async move { on_read_connection!(self, |conn| conn.describe(sql)) })
    }
}

impl<DB: Database> std::fmt::Debug for ReadConnections<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadConnections")
            .field("size", &self.size)
            .finish()
    }
}

/// Whether `e` says the connection is gone rather than the statement failed: an I/O or
/// protocol error, or PostgreSQL's connection exceptions (class 08) and shutdowns (57P).
pub(super) fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::Sqlite;

    use super::*;

    /// On SQLite (no server needed): rows and arguments as on a connection, a connection
    /// reused after a read that completed, closed when dropped without release or after a
    /// read that failed, and none lent beyond the size or after close.
    #[tokio::test]
    async fn reads_reuse_only_connections_whose_statement_completed() {
        let dir = tempfile::tempdir().unwrap();
        let connect = SqliteConnectOptions::from_str("sqlite://")
            .unwrap()
            .filename(dir.path().join("r.db"))
            .create_if_missing(true);
        let reads = ReadConnections::<Sqlite>::new(connect, 1, Duration::from_secs(10));
        let rows: Vec<i64> = sqlx::query_scalar(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
             SELECT i * i FROM n",
        )
        .bind(4_i64)
        .fetch_all(&reads)
        .await
        .unwrap();
        assert_eq!(rows, [1, 4, 9, 16]);
        assert_eq!(reads.idle_count(), 1);
        let held = reads.acquire().await.unwrap();
        assert!(held.reused, "the idle connection is lent again");
        assert!(
            futures::FutureExt::now_or_never(reads.acquire()).is_none(),
            "a second connection was lent beyond the size"
        );
        held.release();
        let dropped = reads.acquire().await.unwrap();
        drop(dropped);
        assert_eq!(reads.idle_count(), 0, "a connection not released is closed");
        let fresh = reads.acquire().await.unwrap();
        assert!(!fresh.reused, "a dropped connection is not lent again");
        fresh.release();
        let failed = sqlx::query_scalar::<_, i64>("SELECT * FROM missing")
            .fetch_one(&reads)
            .await
            .unwrap_err();
        assert!(!connection_lost(&failed), "{failed}");
        assert_eq!(
            reads.idle_count(),
            0,
            "a failed read's connection is closed"
        );
        let one: Option<i64> = sqlx::query_scalar("SELECT ?1")
            .bind(7_i64)
            .fetch_optional(&reads)
            .await
            .unwrap();
        assert_eq!(one, Some(7));
        reads.close().await;
        assert!(reads.acquire().await.is_err(), "closed");
    }

    #[test]
    fn lost_connections_are_told_from_failed_statements() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        assert!(connection_lost(&io));
        assert!(connection_lost(&sqlx::Error::Protocol(
            "unexpected message".into()
        )));
        assert!(!connection_lost(&sqlx::Error::RowNotFound));
        assert!(!connection_lost(&sqlx::Error::PoolTimedOut));
    }
}
