//! The database a test runs on, chosen by the environment: an SQLite file in a temporary
//! directory (the default), or with `SWITCHBOARD_TEST_BACKEND=postgres` a fresh PostgreSQL
//! database (`sb_t_<hex>`) created over the admin URL in `SWITCHBOARD_TEST_POSTGRES` and
//! dropped when the test is done. Either way each test has a database of its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::Connection;

/// Bound on each step of making or dropping a PostgreSQL database.
const LIMIT: Duration = Duration::from_secs(60);

/// The admin URL when the tests run on PostgreSQL, `None` on SQLite.
pub fn postgres_admin_url() -> Option<String> {
    match std::env::var("SWITCHBOARD_TEST_BACKEND").as_deref() {
        Err(_) | Ok("") | Ok("sqlite") => None,
        Ok("postgres") => match std::env::var("SWITCHBOARD_TEST_POSTGRES") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => panic!(
                "SWITCHBOARD_TEST_BACKEND=postgres needs SWITCHBOARD_TEST_POSTGRES, the URL of \
                 a database whose user may create databases \
                 (e.g. postgres://postgres@127.0.0.1:5432/test)"
            ),
        },
        Ok(other) => panic!("SWITCHBOARD_TEST_BACKEND={other:?}: expected sqlite or postgres"),
    }
}

/// A test's own database; it lives as long as this value.
pub struct TestDb {
    /// What the server takes as `--db`: a file path, or the URL of the PostgreSQL database.
    pub path: PathBuf,
    keep: Keep,
}

enum Keep {
    Dir(tempfile::TempDir),
    /// Held to be dropped with the [`TestDb`].
    Postgres {
        _db: PgDatabase,
    },
}

impl TestDb {
    /// A database of the backend the environment selects.
    pub async fn new() -> Self {
        match postgres_admin_url() {
            Some(admin) => {
                let pg = PgDatabase::create(&admin).await;
                Self {
                    path: PathBuf::from(&pg.url),
                    keep: Keep::Postgres { _db: pg },
                }
            }
            None => Self::sqlite(),
        }
    }

    /// An SQLite file whatever the environment says, for what only SQLite has (files, WAL).
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self {
            path: dir.path().join("s.db"),
            keep: Keep::Dir(dir),
        }
    }

    /// The temporary directory of an SQLite database.
    pub fn dir(&self) -> Option<&Path> {
        match &self.keep {
            Keep::Dir(d) => Some(d.path()),
            Keep::Postgres { .. } => None,
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.keep, Keep::Postgres { .. })
    }
}

/// A PostgreSQL database made for one test, dropped (sessions and all) with this value.
pub struct PgDatabase {
    admin: String,
    name: String,
    pub url: String,
}

impl PgDatabase {
    pub async fn create(admin: &str) -> Self {
        let name = format!("sb_t_{:032x}", rand::random::<u128>());
        let mut url = url::Url::parse(admin)
            .unwrap_or_else(|e| panic!("SWITCHBOARD_TEST_POSTGRES is not a URL ({e}): {admin}"));
        url.set_path(&format!("/{name}"));
        let mut conn = admin_connection(admin).await;
        tokio::time::timeout(
            LIMIT,
            sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\"")).execute(&mut conn),
        )
        .await
        .expect("CREATE DATABASE within the limit")
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let _ = conn.close().await;
        Self {
            admin: admin.to_owned(),
            name,
            url: url.to_string(),
        }
    }
}

impl Drop for PgDatabase {
    /// On a thread of its own with its own runtime, so it works from sync code and from
    /// inside a Tokio runtime alike (sessions still open, e.g. a killed server's, are ended).
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(async move {
                    let mut conn = admin_connection(&admin).await;
                    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let r =
                        tokio::time::timeout(LIMIT, sqlx::raw_sql(&sql).execute(&mut conn)).await;
                    let _ = conn.close().await;
                    match r {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("timed out".to_owned()),
                    }
                })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: could not drop test database {}: {e}", self.name),
            Err(_) => eprintln!("warning: dropping test database {} panicked", self.name),
        }
    }
}

async fn admin_connection(admin: &str) -> sqlx::PgConnection {
    tokio::time::timeout(LIMIT, sqlx::PgConnection::connect(admin))
        .await
        .expect("connect to SWITCHBOARD_TEST_POSTGRES within the limit")
        .unwrap_or_else(|e| panic!("connect to SWITCHBOARD_TEST_POSTGRES ({admin}): {e}"))
}

/// A direct connection to a test's database (a file path or a PostgreSQL URL), to check
/// what was stored.
pub enum Conn {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl Conn {
    /// A connection for reading (read-only on SQLite).
    pub async fn open(db: &Path) -> Self {
        Self::connect(db, true).await
    }

    /// A connection for changing the database behind the server's back: its data while it
    /// is stopped, or its schema (a trigger, say) while it runs.
    pub async fn open_writable(db: &Path) -> Self {
        Self::connect(db, false).await
    }

    async fn connect(db: &Path, read_only: bool) -> Self {
        let text = db.to_string_lossy();
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Self::Postgres(
                sqlx::PgConnection::connect(&text)
                    .await
                    .expect("connect to the test database"),
            );
        }
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(db)
            .read_only(read_only);
        Self::Sqlite(
            sqlx::SqliteConnection::connect_with(&options)
                .await
                .expect("open the test database"),
        )
    }

    /// All rows of a query that means the same on both backends.
    pub async fn rows<T>(&mut self, sql: &str) -> Vec<T>
    where
        T: Send
            + Unpin
            + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        match self {
            Self::Sqlite(c) => sqlx::query_as(sql).fetch_all(c).await,
            Self::Postgres(c) => sqlx::query_as(sql).fetch_all(c).await,
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Runs a statement that means the same on both backends.
    pub async fn execute(&mut self, sql: &str) {
        match self {
            Self::Sqlite(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
            Self::Postgres(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// `SELECT count(*) FROM {sql_where}`.
    pub async fn count(&mut self, sql_where: &str) -> i64 {
        let rows: Vec<(i64,)> = self
            .rows(&format!("SELECT count(*) FROM {sql_where}"))
            .await;
        rows[0].0
    }

    pub async fn close(self) {
        let _ = match self {
            Self::Sqlite(c) => c.close().await,
            Self::Postgres(c) => c.close().await,
        };
    }
}
