//! Throwaway PostgreSQL databases, for running the test suites on PostgreSQL: each one is
//! created with a random name (`sb_t_<hex>`) over an admin connection and dropped, with any
//! session still connected to it, when done.

use std::time::Duration;

use anyhow::{bail, Context};
use sqlx::Connection;

/// Every database made here is named with this prefix; [`drop_database`] drops nothing else.
pub const PREFIX: &str = "sb_t_";

/// Bound on each step (connect, create, drop), so a stuck server fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(60);

/// Creates a fresh database on the server of `admin_url` (a URL of a database the user may
/// connect to, with the right to create databases); returns the URL of the new one (the
/// admin URL with its path replaced).
pub async fn create_database(admin_url: &str) -> anyhow::Result<String> {
    let name = format!("{PREFIX}{:032x}", rand::random::<u128>());
    let url = with_database(admin_url, &name)?;
    let mut admin = connect(admin_url).await?;
    let created = tokio::time::timeout(
        LIMIT,
        sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\"")).execute(&mut admin),
    )
    .await;
    let _ = admin.close().await;
    created
        .context("CREATE DATABASE timed out")?
        .with_context(|| format!("CREATE DATABASE {name}"))?;
    Ok(url)
}

/// Drops the database `url` names (one made by [`create_database`]), over a connection to
/// `admin_url`; sessions still connected to it are ended. A missing database is not an error.
pub async fn drop_database(admin_url: &str, url: &str) -> anyhow::Result<()> {
    let name = database_of(url)?;
    let mut admin = connect(admin_url).await?;
    let dropped = tokio::time::timeout(
        LIMIT,
        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut admin),
    )
    .await;
    let _ = admin.close().await;
    dropped
        .context("DROP DATABASE timed out")?
        .with_context(|| format!("DROP DATABASE {name}"))?;
    Ok(())
}

/// A database made by [`create_database`] that is dropped when this value is.
pub struct TempDatabase {
    admin_url: String,
    url: String,
}

impl TempDatabase {
    pub async fn create(admin_url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            url: create_database(admin_url).await?,
            admin_url: admin_url.to_owned(),
        })
    }

    /// The URL of the database.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TempDatabase {
    /// Drops the database on a thread of its own with its own runtime: this works from any
    /// context, a Tokio worker included (which must not block on a future itself).
    fn drop(&mut self) {
        let (admin_url, url) = (self.admin_url.clone(), self.url.clone());
        let done = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("runtime")?
                .block_on(drop_database(&admin_url, &url))
        })
        .join();
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: could not drop test database {}: {e:#}", self.url),
            Err(_) => eprintln!("warning: dropping test database {} panicked", self.url),
        }
    }
}

/// `url` with its database (path) replaced by `name`.
pub fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let mut u = url::Url::parse(url).with_context(|| format!("not a URL: {url:?}"))?;
    if !matches!(u.scheme(), "postgres" | "postgresql") {
        bail!("not a PostgreSQL URL (postgres://...): {}", u.scheme());
    }
    u.set_path(&format!("/{name}"));
    Ok(u.to_string())
}

/// The name of the database `url` names, checked to be one of ours.
fn database_of(url: &str) -> anyhow::Result<String> {
    let u = url::Url::parse(url).with_context(|| format!("not a URL: {url:?}"))?;
    let name = u.path().trim_start_matches('/');
    let ours = name.starts_with(PREFIX)
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ours {
        bail!("refusing to drop {name:?}: not a database made by create_database ({PREFIX}...)");
    }
    Ok(name.to_owned())
}

async fn connect(admin_url: &str) -> anyhow::Result<sqlx::PgConnection> {
    tokio::time::timeout(LIMIT, sqlx::PgConnection::connect(admin_url))
        .await
        .context("connecting to PostgreSQL timed out")?
        .context("connecting to PostgreSQL")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_new_database() {
        assert_eq!(
            with_database(
                "postgres://postgres@127.0.0.1:5432/test?sslmode=disable",
                "sb_t_1"
            )
            .unwrap(),
            "postgres://postgres@127.0.0.1:5432/sb_t_1?sslmode=disable"
        );
        assert!(with_database("mysql://x/y", "sb_t_1").is_err());
        assert_eq!(database_of("postgres://h/sb_t_0af").unwrap(), "sb_t_0af");
        assert!(
            database_of("postgres://h/test").is_err(),
            "only our own databases"
        );
        assert!(database_of("postgres://h/sb_t_x\"; DROP").is_err());
    }
}
