//! Throwaway PostgreSQL databases for scripts (scripts/test.sh runs the compatibility suite
//! on one):
//!
//!   switchboard-pgdb create ADMIN_URL            prints the URL of a new, empty database
//!   switchboard-pgdb drop ADMIN_URL DATABASE_URL drops it (ending its sessions)

use anyhow::bail;
use switchboard_bench::pgdb;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["create", admin] => println!("{}", pgdb::create_database(admin).await?),
        ["drop", admin, url] => pgdb::drop_database(admin, url).await?,
        _ => bail!("usage: switchboard-pgdb create ADMIN_URL | drop ADMIN_URL DATABASE_URL"),
    }
    Ok(())
}
