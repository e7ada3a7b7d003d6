//! Backing up an SQLite database while the server runs, and restoring a backup.
//!
//! Copying the database file by hand is not a backup: committed writes may still be in its
//! `-wal` file, and a copy taken during a commit can be torn. A backup here is SQLite's
//! `VACUUM INTO`, which reads one snapshot (a read transaction: the server goes on writing
//! meanwhile) into a new, compact, self-contained file. It holds every write acknowledged
//! before it started. The file is checked (`integrity_check`), flushed to disk and only
//! then given its name, so a file with the backup's name is always a whole one.
//!
//! Restoring goes through SQLite too (its backup API, in one write transaction), never by
//! copying over the file: a database left by a killed server has committed writes in its
//! `-wal`, and a file copied under an old `-wal` would have them applied to it on the next
//! open, which corrupts it. A restore is all or nothing, and refused while a server holds
//! the database.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rusqlite::{Connection, OpenFlags};

use crate::{Database, ServeLock};

/// What a backup or a restore wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The file written: the backup, or the restored database.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Accounts in it.
    pub accounts: i64,
    /// Messages in it, deleted ones left out.
    pub messages: i64,
    /// The newest migration applied to it.
    pub schema_version: i64,
    /// How long it took.
    pub elapsed: Duration,
    /// What the operator should know about the result.
    pub warnings: Vec<String>,
}

/// How long a statement waits for a lock another connection holds (the server's writer
/// holds the write lock only for a commit).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes a consistent copy of the SQLite database `db` names to the new file `to`, while a
/// server may be using the database. Refuses to overwrite anything.
pub fn backup(db: &Path, to: &Path) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let Database::Sqlite(source) = Database::parse(db)? else {
        bail!(
            "backup copies an SQLite database; for PostgreSQL use its own tools, \
             e.g. pg_dump --format=custom --file=switchboard.dump URL"
        );
    };
    if !source.is_file() {
        bail!("no database at {}: nothing to back up", source.display());
    }
    if to.symlink_metadata().is_ok() {
        bail!(
            "{} exists: a backup never overwrites a file; give a new name",
            to.display()
        );
    }
    let Some(partial_name) = to.to_str().map(|t| format!("{t}.partial")) else {
        bail!("{}: the backup's path must be valid UTF-8", to.display());
    };
    let partial = PathBuf::from(&partial_name);
    // A leftover of a backup to the same name that was interrupted.
    match std::fs::remove_file(&partial) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", partial.display()));
        }
        _ => {}
    }
    let written = (|| -> anyhow::Result<Summary> {
        // Read-write only because a reader of a WAL database writes its `-shm` index.
        let conn = open_existing(&source, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        let schema_version = schema_version(&conn, &source)?;
        conn.execute("VACUUM INTO ?1", [&partial_name])
            .with_context(|| format!("copying {} to {}", source.display(), partial.display()))?;
        drop(conn);
        let copy = open_existing(&partial, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        // One self-contained file, readable without a -wal or -shm beside it.
        copy.pragma_update_and_check(None, "journal_mode", "DELETE", |r| r.get::<_, String>(0))
            .with_context(|| format!("preparing {}", partial.display()))?;
        let mut summary = check(&copy, &partial)?;
        summary.schema_version = schema_version;
        drop(copy);
        std::fs::File::open(&partial)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("flushing {}", partial.display()))?;
        Ok(summary)
    })();
    let mut summary = match written {
        Ok(summary) => summary,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, to)
        .with_context(|| format!("renaming {} to {}", partial.display(), to.display()))?;
    sync_parent(to)?;
    summary.path = to.to_path_buf();
    summary.bytes = std::fs::metadata(to)
        .with_context(|| format!("reading {}", to.display()))?
        .len();
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Replaces the SQLite database `db` names with the backup `from`, all or nothing. The
/// server must be stopped; an existing database is replaced only with `replace`.
pub fn restore(db: &Path, from: &Path, replace: bool) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let Database::Sqlite(target) = Database::parse(db)? else {
        bail!(
            "restore writes an SQLite database; for PostgreSQL use its own tools, \
             e.g. pg_restore --clean --dbname=URL switchboard.dump"
        );
    };
    if !from.is_file() {
        bail!("no backup at {}", from.display());
    }
    let source = open_existing(from, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let schema_version = schema_version(&source, from)?;
    let known = crate::store::sqlite::latest_migration();
    if schema_version > known {
        bail!(
            "{} is from a newer switchboard (migration {schema_version}; this one knows up to \
             {known}): restore it with that version",
            from.display()
        );
    }
    check(&source, from)?;
    // The lock `serve` holds: a server must not have the file replaced under it.
    let _lock = ServeLock::acquire(db).context("restoring needs the server stopped")?;
    let existed = target.symlink_metadata().is_ok();
    let mut warnings = Vec::new();
    if existed && !replace {
        let what = match open_existing(&target, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| counts(&c, &target))
        {
            Ok((accounts, messages)) => format!("{accounts} accounts, {messages} messages"),
            Err(_) => "not readable as a switchboard database".to_owned(),
        };
        bail!(
            "{} exists ({what}): restoring replaces everything in it; back it up first \
             (switchboard backup FILE) and add --replace",
            target.display()
        );
    }
    let mut dest = Connection::open(&target)
        .with_context(|| format!("opening {} to restore into", target.display()))?;
    dest.busy_timeout(BUSY_TIMEOUT)?;
    dest.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
        .with_context(|| {
            format!(
                "opening {} to restore into (if it is damaged, move it and its -wal and -shm \
                 files away, then restore to its path)",
                target.display()
            )
        })?;
    // The positions the replaced database handed out (stream cursors, `Last-Event-ID`):
    // new ones must start above them, or a client resuming from one would skip what is
    // written after the restore.
    let replaced_head = match last_position(&dest) {
        Ok(head) => Some(head),
        Err(e) => {
            if existed {
                warnings.push(format!(
                    "the positions {} handed out could not be read ({e}): a stream client \
                     resuming from one of them may miss events written after the restore; \
                     such clients should reconnect without a cursor",
                    target.display()
                ));
            }
            None
        }
    };
    let staged = Staged::copy(&source, &target)?;
    let restored_head = last_position(&staged.conn)
        .with_context(|| format!("reading {}", staged.path.display()))?;
    if let Some(head) = replaced_head.filter(|&h| h > restored_head) {
        staged
            .conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('seq_floor', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                [head],
            )
            .with_context(|| format!("preparing {}", staged.path.display()))?;
    }
    // One write transaction: a restore cut short leaves the database as it was.
    copy_all(&staged.conn, &mut dest)
        .with_context(|| format!("restoring into {}", target.display()))?;
    drop(staged);
    // Fold the restored pages into the file now rather than at the server's next start.
    dest.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .with_context(|| format!("checkpointing {}", target.display()))?;
    let mut summary = check(&dest, &target)?;
    summary.schema_version = schema_version;
    drop(dest);
    summary.path = target.clone();
    summary.bytes = std::fs::metadata(&target)
        .with_context(|| format!("reading {}", target.display()))?
        .len();
    summary.elapsed = started.elapsed();
    summary.warnings = warnings;
    Ok(summary)
}

/// A working copy of the backup beside the database, so that what the restore adds to it
/// (the position floor) goes in with the same transaction; removed when dropped.
struct Staged {
    path: PathBuf,
    conn: Connection,
}

impl Staged {
    fn copy(source: &Connection, target: &Path) -> anyhow::Result<Self> {
        let mut name = target.as_os_str().to_owned();
        name.push(".restoring");
        let path = PathBuf::from(name);
        // Left by a restore that was cut short.
        let _ = std::fs::remove_file(&path);
        let mut staged = Self {
            conn: Connection::open(&path)
                .with_context(|| format!("creating {}", path.display()))?,
            path,
        };
        // Through SQLite, not a file copy: a backup file that has a -wal beside it is read
        // whole.
        copy_all(source, &mut staged.conn)
            .with_context(|| format!("copying the backup to {}", staged.path.display()))?;
        Ok(staged)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(self.path.with_extension("restoring-journal"));
    }
}

/// Copies every page of `from` into `to` in one step, so in one read transaction of `from`
/// and one write transaction of `to`.
fn copy_all(from: &Connection, to: &mut Connection) -> anyhow::Result<()> {
    let copy = rusqlite::backup::Backup::new(from, to)?;
    match copy.step(-1)? {
        rusqlite::backup::StepResult::Done => Ok(()),
        other => bail!("the database is in use ({other:?}); try again"),
    }
}

/// The newest position (message, event or webhook event) a switchboard database handed out.
fn last_position(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT max(coalesce((SELECT max(seq) FROM messages), 0), \
                    coalesce((SELECT max(seq) FROM events), 0), \
                    coalesce((SELECT max(seq) FROM webhook_events), 0), \
                    coalesce((SELECT max(value) FROM meta WHERE key = 'seq_floor'), 0))",
        [],
        |r| r.get(0),
    )
}

/// Opens an SQLite file that must exist (without `SQLITE_OPEN_CREATE`, so a wrong path is an
/// error, not a new empty database).
fn open_existing(path: &Path, mode: OpenFlags) -> anyhow::Result<Connection> {
    let conn = Connection::open_with_flags(path, mode | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// The newest migration of a switchboard database; an error for any other file.
fn schema_version(conn: &Connection, path: &Path) -> anyhow::Result<i64> {
    let version: Option<i64> = conn
        .query_row(
            "SELECT max(version) FROM _sqlx_migrations WHERE success",
            [],
            |r| r.get(0),
        )
        .map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::NotADatabase => {
                anyhow::anyhow!("{} is not an SQLite database", path.display())
            }
            rusqlite::Error::SqliteFailure(..) => anyhow::anyhow!(
                "{} is not a switchboard database (it has no migrations table): {e}",
                path.display()
            ),
            other => anyhow::Error::new(other).context(format!("reading {}", path.display())),
        })?;
    version.with_context(|| format!("{} has no migrations applied", path.display()))
}

/// Checks the whole file (`PRAGMA integrity_check`) and counts what is in it.
fn check(conn: &Connection, path: &Path) -> anyhow::Result<Summary> {
    let mut problems = Vec::new();
    let mut stmt = conn
        .prepare("PRAGMA integrity_check(10)")
        .with_context(|| format!("checking {}", path.display()))?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let line: String = row.get(0)?;
        if line != "ok" {
            problems.push(line);
        }
    }
    if !problems.is_empty() {
        bail!("{} is damaged: {}", path.display(), problems.join("; "));
    }
    let (accounts, messages) = counts(conn, path)?;
    Ok(Summary {
        path: path.to_path_buf(),
        bytes: 0,
        accounts,
        messages,
        schema_version: 0,
        elapsed: Duration::ZERO,
        warnings: Vec::new(),
    })
}

/// Accounts and (not deleted) messages in a switchboard database.
fn counts(conn: &Connection, path: &Path) -> anyhow::Result<(i64, i64)> {
    conn.query_row(
        "SELECT (SELECT count(*) FROM accounts), \
                (SELECT count(*) FROM messages WHERE deleted_at IS NULL)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .with_context(|| format!("counting what {} holds", path.display()))
}

/// Flushes the directory holding `path`, so that a rename into it survives a power cut.
fn sync_parent(path: &Path) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("flushing the directory {}", dir.display()))
}
