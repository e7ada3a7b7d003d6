//! The reference that issue 2's POST target was set against: a minimal axum + SQLite
//! server with one writer thread doing group commit. It takes the same request body as
//! switchboard's `POST /v3/conversations/messages`, writes one row per message with the same
//! durability (WAL, `synchronous=FULL`: fsynced before the answer) and answers the row as
//! JSON. No authentication, no agents, no conversations, no feed: what is left is the
//! least any durable HTTP write on this machine costs, measured in the same rounds as
//! switchboard so that the machine's drift cancels out.

use std::path::Path;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// The fields of switchboard's POST body that the reference keeps (and answers).
#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct NewMessage {
    visitor_id: String,
    text: String,
    agent_name: Option<String>,
}

struct Insert {
    message: NewMessage,
    created_at: i64,
    reply: oneshot::Sender<Result<Stored, String>>,
}

/// A message as written, which is also the answer.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    id: i64,
    #[serde(flatten)]
    message: NewMessage,
    created_at: i64,
}

const MAX_BATCH: usize = 512;

/// Serves `POST /reference` on an ephemeral loopback port until killed, writing to a
/// SQLite file in `dir`.
#[tokio::main]
pub async fn serve(dir: &Path) -> anyhow::Result<()> {
    let tx = start_writer(&dir.join("reference.db"))?;
    let app = axum::Router::new()
        .route("/reference", axum::routing::post(post))
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

/// Opens (creating) the database at `path` and starts the writer thread; it ends when
/// every sender is dropped.
fn start_writer(path: &Path) -> anyhow::Result<mpsc::Sender<Insert>> {
    let conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
         CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, visitor_id TEXT NOT NULL, \
         text TEXT NOT NULL, agent_name TEXT, created_at INTEGER NOT NULL);",
    )?;
    let (tx, rx) = mpsc::channel::<Insert>(8192);
    std::thread::Builder::new()
        .name("reference-writer".into())
        .spawn(move || writer(conn, rx))?;
    Ok(tx)
}

async fn post(
    State(writer): State<mpsc::Sender<Insert>>,
    axum::Json(message): axum::Json<NewMessage>,
) -> Result<axum::Json<Stored>, (StatusCode, String)> {
    let created_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let (reply, answer) = oneshot::channel();
    let unavailable = |e: String| (StatusCode::SERVICE_UNAVAILABLE, e);
    writer
        .send(Insert {
            message,
            created_at,
            reply,
        })
        .await
        .map_err(|_| unavailable("writer gone".into()))?;
    match answer.await {
        Ok(Ok(stored)) => Ok(axum::Json(stored)),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(unavailable("writer gone".into())),
    }
}

/// One transaction per batch: everything queued when the previous commit ended.
fn writer(mut conn: rusqlite::Connection, mut rx: mpsc::Receiver<Insert>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        match insert(&mut conn, &batch) {
            Ok(ids) => {
                for (i, id) in batch.drain(..).zip(ids) {
                    let stored = Stored {
                        id,
                        message: i.message,
                        created_at: i.created_at,
                    };
                    let _ = i.reply.send(Ok(stored));
                }
            }
            Err(e) => {
                for i in batch.drain(..) {
                    let _ = i.reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

/// Inserts a batch in one transaction: the rows' ids, in order, or nothing.
fn insert(conn: &mut rusqlite::Connection, batch: &[Insert]) -> rusqlite::Result<Vec<i64>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut ids = Vec::with_capacity(batch.len());
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO messages (visitor_id, text, agent_name, created_at) \
             VALUES (?1, ?2, ?3, ?4)",
        )?;
        for i in batch {
            stmt.execute(rusqlite::params![
                i.message.visitor_id,
                i.message.text,
                i.message.agent_name,
                i.created_at
            ])?;
            ids.push(tx.last_insert_rowid());
        }
    }
    // Dropped without a commit on any error above: rolled back, nothing half-written.
    tx.commit()?;
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_answered_insert_is_in_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reference.db");
        let writer = start_writer(&path).unwrap();
        let mut answers = Vec::new();
        for i in 0..50 {
            let (reply, answer) = oneshot::channel();
            let message = NewMessage {
                visitor_id: format!("v{i}"),
                text: format!("text {i}"),
                agent_name: None,
            };
            writer
                .send(Insert {
                    message,
                    created_at: i,
                    reply,
                })
                .await
                .unwrap();
            answers.push(answer);
        }
        let mut ids = Vec::new();
        for a in answers {
            let stored = a.await.unwrap().unwrap();
            assert_eq!(stored.message.text, format!("text {}", stored.created_at));
            ids.push(stored.id);
        }
        assert_eq!(ids, (1..=50).collect::<Vec<i64>>(), "ids in the order sent");
        drop(writer);
        let conn = rusqlite::Connection::open(&path).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 50);
    }
}
