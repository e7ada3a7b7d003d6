//! What both backends do with the same SQL, written once: reads on the backend's reader,
//! and writes that need nothing of the writer but its connection.
//!
//! The SQL numbers its parameters (`$1`), which sqlx's SQLite driver binds by number just
//! as PostgreSQL does.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Type};

use super::cache::{email_key, AgentBy, AgentCache};
use super::shared::*;
use super::*;

/// A backend built on sqlx: it gets [`Portable`] from here.
pub(super) trait SqlBackend: Send + Sync + 'static {
    /// The sqlx database of the backend.
    type Db: Database;
    /// What serves reads (on PostgreSQL not sqlx's pool, see `ReadConnections`).
    type Reader<'a>: Executor<'a, Database = Self::Db> + Copy
    where
        Self: 'a;
    /// The executor for reads.
    fn reader(&self) -> Self::Reader<'_>;
    /// The backend's cache of agents.
    fn agents(&self) -> &AgentCache;
    /// Runs `f` on the writer's connection inside the writer's transaction, answering
    /// once that has committed (the backend's `write`).
    fn write_sql<T, F>(&self, f: F) -> impl Future<Output = StoreResult<T>> + Send
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut Connection<Self>) -> BoxFuture<'c, StoreResult<T>>
            + Send
            + 'static;
    /// How many rows a statement changed (sqlx has no trait for it).
    fn rows_affected(r: &<Self::Db as Database>::QueryResult) -> u64;
}

/// The connection type of a backend.
pub(super) type Connection<S> = <<S as SqlBackend>::Db as Database>::Connection;

/// Deletes the row `id` of an account from `table`; false if there is none.
// A plain function returning the writer's future (not an `async fn`): the compiler cannot
// prove an `async fn` future holding `&S` Send under these higher-ranked bounds.
pub(super) fn delete_owned<'a, S>(
    store: &'a S,
    table: &'static str,
    account_id: &str,
    id: &str,
) -> impl Future<Output = StoreResult<bool>> + Send + 'a
where
    S: SqlBackend,
    for<'c> &'c mut Connection<S>: Executor<'c, Database = S::Db>,
    for<'q> <S::Db as Database>::Arguments<'q>: IntoArguments<'q, S::Db>,
    for<'q> String: Encode<'q, S::Db> + Type<S::Db>,
{
    let (account_id, id) = (account_id.to_owned(), id.to_owned());
    store.write_sql(move |conn| {
        Box::pin(async move {
            let sql = format!("DELETE FROM {table} WHERE account_id = $1 AND id = $2");
            let r = sqlx::query(&sql)
                .bind(&account_id)
                .bind(&id)
                .execute(&mut *conn)
                .await?;
            Ok(S::rows_affected(&r) > 0)
        })
    })
}

/// Counts a failure against an endpoint, or clears its failures after a success; the common
/// case, a success at a healthy endpoint, touches nothing.
pub(super) async fn update_health<DB>(
    conn: &mut DB::Connection,
    o: &AttemptOutcome,
) -> StoreResult<EndpointHealth>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> bool: Encode<'q, DB> + Type<DB>,
    for<'r> (i64, Option<i64>): FromRow<'r, DB::Row>,
{
    let delivered = o.error.is_none();
    let mut health = EndpointHealth::default();
    if delivered && !o.endpoint_was_unhealthy {
        return Ok(health);
    }
    let row: Option<(i64, Option<i64>)> =
        sqlx::query_as("SELECT consecutive_failures, failing_since FROM webhooks WHERE id = $1")
            .bind(&o.webhook_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((failures, failing_since)) = row else {
        return Ok(health);
    };
    if delivered {
        health.recovered = failing_since.is_some();
        sqlx::query(
            "UPDATE webhooks SET consecutive_failures = 0, failing_since = NULL WHERE id = $1",
        )
        .bind(&o.webhook_id)
        .execute(&mut *conn)
        .await?;
    } else {
        let failures = failures + 1;
        let becomes = failing_since.is_none() && failures >= o.failing_after;
        health.became_failing = becomes;
        sqlx::query(
            "UPDATE webhooks SET consecutive_failures = $1, last_error = $2, \
             failing_since = CASE WHEN $3 THEN $4 ELSE failing_since END WHERE id = $5",
        )
        .bind(failures)
        .bind(&o.error)
        .bind(becomes)
        .bind(o.at)
        .bind(&o.webhook_id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(health)
}

// The bounds are what sqlx needs to bind these parameters and decode these rows on the
// backend's database; sqlx's SQLite and PostgreSQL drivers meet them all.
#[async_trait]
impl<S> Portable for S
where
    S: SqlBackend,
    for<'c> &'c mut Connection<S>: Executor<'c, Database = S::Db>,
    for<'q> <S::Db as Database>::Arguments<'q>: IntoArguments<'q, S::Db>,
    for<'q> &'q str: Encode<'q, S::Db> + Type<S::Db>,
    for<'q> String: Encode<'q, S::Db> + Type<S::Db>,
    for<'q> Option<String>: Encode<'q, S::Db> + Type<S::Db>,
    for<'q> bool: Encode<'q, S::Db> + Type<S::Db>,
    for<'q> Option<bool>: Encode<'q, S::Db> + Type<S::Db>,
    for<'q> i64: Encode<'q, S::Db> + Type<S::Db>,
    for<'q> Option<&'q str>: Encode<'q, S::Db> + Type<S::Db>,
    for<'r> (String, String): FromRow<'r, <S::Db as Database>::Row>,
    for<'r> (String, i64): FromRow<'r, <S::Db as Database>::Row>,
    for<'r> Account: FromRow<'r, <S::Db as Database>::Row>,
    for<'r> ApiKey: FromRow<'r, <S::Db as Database>::Row>,
    for<'r> AgentRow: FromRow<'r, <S::Db as Database>::Row>,
    for<'r> GroupRow: FromRow<'r, <S::Db as Database>::Row>,
    for<'r> MessageRow: FromRow<'r, <S::Db as Database>::Row>,
    for<'r> WidgetAccount: FromRow<'r, <S::Db as Database>::Row>,
    for<'r> VisitorRow: FromRow<'r, <S::Db as Database>::Row>,
    for<'r> WebhookRow: FromRow<'r, <S::Db as Database>::Row>,
    for<'r> DeliveryRow: FromRow<'r, <S::Db as Database>::Row>,
    for<'r> AttemptRow: FromRow<'r, <S::Db as Database>::Row>,
    for<'r> ChatRow: FromRow<'r, <S::Db as Database>::Row>,
{
    async fn ready(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(self.reader()).await?;
        // Through the writer's queue, in its next transaction: one that changes nothing,
        // so it writes nothing to disk.
        self.write_sql(|_: &mut Connection<S>| -> BoxFuture<'_, StoreResult<()>> {
            Box::pin(async { Ok(()) })
        })
        .await
    }

    async fn webhook_delivery_counts(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT status, count(*) FROM webhook_deliveries GROUP BY status ORDER BY status",
        )
        .fetch_all(self.reader())
        .await?)
    }

    async fn list_accounts(&self) -> StoreResult<Vec<Account>> {
        Ok(sqlx::query_as(
            "SELECT id, name, is_default, created_at FROM accounts ORDER BY created_at, id",
        )
        .fetch_all(self.reader())
        .await?)
    }

    async fn account(&self, id: &str) -> StoreResult<Option<Account>> {
        Ok(
            sqlx::query_as("SELECT id, name, is_default, created_at FROM accounts WHERE id = $1")
                .bind(id)
                .fetch_optional(self.reader())
                .await?,
        )
    }

    async fn account_for_key(&self, key_hash: &str) -> StoreResult<Option<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT account_id, key_hash FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(key_hash)
        .fetch_optional(self.reader())
        .await?)
    }

    async fn list_api_keys(&self, account_id: &str) -> StoreResult<Vec<ApiKey>> {
        Ok(sqlx::query_as(
            "SELECT id, account_id, name, prefix, created_at, revoked_at FROM api_keys \
             WHERE account_id = $1 ORDER BY created_at, id",
        )
        .bind(account_id)
        .fetch_all(self.reader())
        .await?)
    }

    async fn agent(&self, account_id: &str, id: &str) -> StoreResult<Option<Arc<AgentRow>>> {
        let fetch = || async move {
            sqlx::query_as(&format!(
                "SELECT {AGENT_COLUMNS} FROM agents WHERE account_id = $1 AND id = $2"
            ))
            .bind(account_id)
            .bind(id)
            .fetch_optional(self.reader())
            .await
        };
        Ok(self
            .agents()
            .get_or_fetch(account_id, AgentBy::Id(id), fetch)
            .await?)
    }

    async fn agent_by_email(
        &self,
        account_id: &str,
        email: &str,
    ) -> StoreResult<Option<Arc<AgentRow>>> {
        let email_key = email_key(email);
        let fetch = || async {
            sqlx::query_as(&format!(
                "SELECT {AGENT_COLUMNS} FROM agents WHERE account_id = $1 AND email_key = $2"
            ))
            .bind(account_id)
            .bind(email_key.as_ref())
            .fetch_optional(self.reader())
            .await
        };
        Ok(self
            .agents()
            .get_or_fetch(account_id, AgentBy::Email(&email_key), fetch)
            .await?)
    }

    async fn list_agents(&self, account_id: &str) -> StoreResult<Vec<(AgentRow, Vec<String>)>> {
        let agents: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE account_id = $1 ORDER BY created_at, id"
        ))
        .bind(account_id)
        .fetch_all(self.reader())
        .await?;
        let members: Vec<(String, String)> = sqlx::query_as(
            "SELECT agent_id, group_id FROM group_members WHERE account_id = $1 ORDER BY group_id",
        )
        .bind(account_id)
        .fetch_all(self.reader())
        .await?;
        let mut groups: HashMap<String, Vec<String>> = HashMap::new();
        for (agent, group) in members {
            groups.entry(agent).or_default().push(group);
        }
        Ok(agents
            .into_iter()
            .map(|a| {
                let g = groups.remove(&a.id).unwrap_or_default();
                (a, g)
            })
            .collect())
    }

    async fn pick_agent(
        &self,
        account_id: &str,
        group_id: Option<&str>,
        now: i64,
    ) -> StoreResult<Option<AgentRow>> {
        let row = match group_id {
            Some(g) => {
                sqlx::query_as(&format!(
                    "SELECT {AGENT_COLUMNS_A} FROM agents a \
                     JOIN group_members m ON m.agent_id = a.id AND m.group_id = $1 \
                     WHERE a.account_id = $2 ORDER BY (a.online_until > $3) DESC, random() LIMIT 1"
                ))
                .bind(g)
                .bind(account_id)
                .bind(now)
                .fetch_optional(self.reader())
                .await?
            }
            None => {
                sqlx::query_as(&format!(
                    "SELECT {AGENT_COLUMNS_A} FROM agents a WHERE a.account_id = $1 \
                     ORDER BY (a.online_until > $2) DESC, random() LIMIT 1"
                ))
                .bind(account_id)
                .bind(now)
                .fetch_optional(self.reader())
                .await?
            }
        };
        Ok(row)
    }

    async fn group(&self, account_id: &str, id: &str) -> StoreResult<Option<GroupRow>> {
        Ok(sqlx::query_as(
            "SELECT id, account_id, name, created_at FROM groups WHERE account_id = $1 AND id = $2",
        )
        .bind(account_id)
        .bind(id)
        .fetch_optional(self.reader())
        .await?)
    }

    async fn list_groups(&self, account_id: &str) -> StoreResult<Vec<GroupRow>> {
        Ok(sqlx::query_as(
            "SELECT id, account_id, name, created_at FROM groups WHERE account_id = $1 \
             ORDER BY created_at, id",
        )
        .bind(account_id)
        .fetch_all(self.reader())
        .await?)
    }

    async fn widget_account(&self, widget_id: &str) -> StoreResult<Option<WidgetAccount>> {
        Ok(sqlx::query_as(
            "SELECT id AS account_id, widget_id, identity_key FROM accounts WHERE widget_id = $1",
        )
        .bind(widget_id)
        .fetch_optional(self.reader())
        .await?)
    }

    async fn visitor(&self, account_id: &str, visitor_id: &str) -> StoreResult<Option<VisitorRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {VISITOR_COLUMNS} FROM visitors v JOIN conversations c \
             ON c.account_id = v.account_id AND c.visitor_id = v.id \
             WHERE v.account_id = $1 AND v.id = $2"
        ))
        .bind(account_id)
        .bind(visitor_id)
        .fetch_optional(self.reader())
        .await?)
    }

    async fn list_webhooks(&self, account_id: &str) -> StoreResult<Vec<WebhookRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE account_id = $1 ORDER BY created_at, id"
        ))
        .bind(account_id)
        .fetch_all(self.reader())
        .await?)
    }

    async fn webhook(&self, account_id: &str, id: &str) -> StoreResult<Option<WebhookRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE account_id = $1 AND id = $2"
        ))
        .bind(account_id)
        .bind(id)
        .fetch_optional(self.reader())
        .await?)
    }

    async fn delivery(
        &self,
        account_id: &str,
        webhook_id: &str,
        event_id: &str,
    ) -> StoreResult<Option<DeliveryRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {DELIVERY_COLUMNS} \
             FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id \
             WHERE d.account_id = $1 AND d.webhook_id = $2 AND d.event_id = $3"
        ))
        .bind(account_id)
        .bind(webhook_id)
        .bind(event_id)
        .fetch_optional(self.reader())
        .await?)
    }

    async fn list_attempts(
        &self,
        account_id: &str,
        webhook_id: &str,
        event_id: &str,
    ) -> StoreResult<Vec<AttemptRow>> {
        Ok(sqlx::query_as(
            "SELECT a.event_id, a.attempt, a.at, a.status_code, a.latency_ms, a.error \
             FROM webhook_attempts a JOIN webhooks w ON w.id = a.webhook_id \
             WHERE w.account_id = $1 AND a.webhook_id = $2 AND a.event_id = $3 ORDER BY a.attempt",
        )
        .bind(account_id)
        .bind(webhook_id)
        .bind(event_id)
        .fetch_all(self.reader())
        .await?)
    }

    async fn messages_between(
        &self,
        account_id: &str,
        visitor_id: &str,
        from_seq: i64,
        to_seq: i64,
    ) -> StoreResult<Vec<MessageRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE account_id = $1 AND visitor_id = $2 \
             AND seq > $3 AND seq <= $4 AND deleted_at IS NULL ORDER BY seq"
        ))
        .bind(account_id)
        .bind(visitor_id)
        .bind(from_seq)
        .bind(to_seq)
        .fetch_all(self.reader())
        .await?)
    }

    async fn chat(&self, account_id: &str, chat_id: &str) -> StoreResult<Option<ChatInfo>> {
        let row: Option<ChatRow> = sqlx::query_as(&format!(
            "SELECT {CHAT_COLUMNS} FROM chats WHERE account_id = $1 AND id = $2"
        ))
        .bind(account_id)
        .bind(chat_id)
        .fetch_optional(self.reader())
        .await?;
        Ok(row.map(ChatInfo::from))
    }

    async fn create_api_key(&self, key: &ApiKey, key_hash: &str) -> StoreResult<()> {
        let key = key.clone();
        let key_hash = key_hash.to_owned();
        self.write_sql(move |conn| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO api_keys (id, account_id, name, key_hash, prefix, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&key.id)
                .bind(&key.account_id)
                .bind(&key.name)
                .bind(&key_hash)
                .bind(&key.prefix)
                .bind(key.created_at)
                .execute(&mut *conn)
                .await
                .map_err(|e| conflict_on_unique(e, "this API key"))?;
                Ok(())
            })
        })
        .await
    }

    async fn revoke_api_key(&self, account_id: &str, key_id: &str, now: i64) -> StoreResult<bool> {
        let (account_id, key_id) = (account_id.to_owned(), key_id.to_owned());
        self.write_sql(move |conn| {
            Box::pin(async move {
                let r = sqlx::query(
                    "UPDATE api_keys SET revoked_at = $1 \
                     WHERE account_id = $2 AND id = $3 AND revoked_at IS NULL",
                )
                .bind(now)
                .bind(&account_id)
                .bind(&key_id)
                .execute(&mut *conn)
                .await?;
                Ok(S::rows_affected(&r) > 0)
            })
        })
        .await
    }

    async fn create_group(&self, group: &GroupRow) -> StoreResult<()> {
        let group = group.clone();
        self.write_sql(move |conn| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO groups (id, account_id, name, created_at) VALUES ($1, $2, $3, $4)",
                )
                .bind(&group.id)
                .bind(&group.account_id)
                .bind(&group.name)
                .bind(group.created_at)
                .execute(&mut *conn)
                .await
                .map_err(|e| conflict_on_unique(e, "a group with this name"))?;
                Ok(())
            })
        })
        .await
    }

    async fn set_visitor_group(
        &self,
        account_id: &str,
        visitor_id: &str,
        group_id: Option<&str>,
        now: i64,
    ) -> StoreResult<Option<()>> {
        let (account_id, visitor_id) = (account_id.to_owned(), visitor_id.to_owned());
        let group_id = group_id.map(str::to_owned);
        self.write_sql(move |conn| {
            Box::pin(async move {
                let r = sqlx::query(
                    "UPDATE visitors SET group_id = $1, updated_at = $2 \
                     WHERE account_id = $3 AND id = $4",
                )
                .bind(&group_id)
                .bind(now)
                .bind(&account_id)
                .bind(&visitor_id)
                .execute(&mut *conn)
                .await?;
                Ok((S::rows_affected(&r) > 0).then_some(()))
            })
        })
        .await
    }

    async fn widget_of(&self, account_id: &str) -> StoreResult<Option<WidgetAccount>> {
        let (a, new_widget, new_key) = (
            account_id.to_owned(),
            crate::ids::new_widget_id(),
            crate::ids::new_identity_key(),
        );
        // Accounts made before a widget id existed get theirs on first use.
        self.write_sql(move |conn| {
            Box::pin(async move {
                sqlx::query(
                    "UPDATE accounts SET widget_id = coalesce(widget_id, $1), \
                     identity_key = coalesce(identity_key, $2) WHERE id = $3",
                )
                .bind(&new_widget)
                .bind(&new_key)
                .bind(&a)
                .execute(&mut *conn)
                .await?;
                Ok(sqlx::query_as(
                    "SELECT id AS account_id, widget_id, identity_key FROM accounts WHERE id = $1",
                )
                .bind(&a)
                .fetch_optional(&mut *conn)
                .await?)
            })
        })
        .await
    }

    async fn set_identity_key(&self, account_id: &str, key: &str) -> StoreResult<bool> {
        let (a, k) = (account_id.to_owned(), key.to_owned());
        self.write_sql(move |conn| {
            Box::pin(async move {
                let r = sqlx::query("UPDATE accounts SET identity_key = $1 WHERE id = $2")
                    .bind(&k)
                    .bind(&a)
                    .execute(&mut *conn)
                    .await?;
                Ok(S::rows_affected(&r) > 0)
            })
        })
        .await
    }

    async fn create_webhook(&self, w: &WebhookRow) -> StoreResult<()> {
        let w = w.clone();
        self.write_sql(move |conn| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO webhooks (id, account_id, url, events, description, enabled, \
                     secret, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&w.id)
                .bind(&w.account_id)
                .bind(&w.url)
                .bind(&w.events)
                .bind(&w.description)
                .bind(w.enabled)
                .bind(&w.secret)
                .bind(w.created_at)
                .execute(&mut *conn)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn update_webhook(
        &self,
        account_id: &str,
        id: &str,
        patch: WebhookPatch,
    ) -> StoreResult<Option<WebhookRow>> {
        let (a, i) = (account_id.to_owned(), id.to_owned());
        self.write_sql(move |conn| {
            Box::pin(async move {
                let (set_description, description) = match patch.description {
                    Some(d) => (true, d),
                    None => (false, None),
                };
                Ok(sqlx::query_as(&format!(
                    "UPDATE webhooks SET url = coalesce($1, url), events = coalesce($2, events), \
                     description = CASE WHEN $3 THEN $4 ELSE description END, \
                     enabled = coalesce($5, enabled) WHERE account_id = $6 AND id = $7 \
                     RETURNING {WEBHOOK_COLUMNS}"
                ))
                .bind(&patch.url)
                .bind(&patch.events)
                .bind(set_description)
                .bind(&description)
                .bind(patch.enabled)
                .bind(&a)
                .bind(&i)
                .fetch_optional(&mut *conn)
                .await?)
            })
        })
        .await
    }

    async fn remove_group(&self, account_id: &str, id: &str) -> StoreResult<bool> {
        delete_owned(self, "groups", account_id, id).await
    }

    async fn remove_webhook(&self, account_id: &str, id: &str) -> StoreResult<bool> {
        delete_owned(self, "webhooks", account_id, id).await
    }
}
