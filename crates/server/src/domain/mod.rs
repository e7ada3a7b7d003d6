//! The rules of switchboard: accounts and keys, agents and presence, messages, visitors.
//!
//! Plain Rust over the [`Store`] trait; no HTTP types. Input values are parsed into types
//! that can only hold valid values ([`Text`], [`VisitorId`], [`AgentRef`]), so a rule is
//! checked once, where the value enters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::ids;
use crate::store::{
    Account, AgentRow, ApiKey, EventKind, GroupRow, Guarded, IdempotencyRecord, MessageChange,
    MessageRow, NewAgent, Store, StoreError, StoredResponse, Window,
};

mod hooks;
mod values;
mod widget;
pub use hooks::{NewWebhook, WEBHOOK_EVENTS};
pub use values::*;
pub use widget::{SessionStart, VisitorAuth, VisitorSession};

/// Everything that can go wrong in a domain operation, by what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// A required value is missing or empty.
    #[error("{0}")]
    Missing(String),
    /// A value has the wrong type or form, or names something that does not exist.
    #[error("{0}")]
    Invalid(String),
    /// A value is too long or too large.
    #[error("{0}")]
    OutOfRange(String),
    /// The object does not exist in the caller's account.
    #[error("{0}")]
    NotFound(String),
    /// The operation is not allowed on this object.
    #[error("{0}")]
    PermissionDenied(String),
    /// A unique value is already taken.
    #[error("{0}")]
    Duplicate(String),
    /// An idempotency key was reused for a different request.
    #[error("{0}")]
    KeyReused(String),
    /// The credentials are missing or wrong.
    #[error("{0}")]
    Unauthorized(String),
    /// Too many requests; try again in `retry_after` seconds.
    #[error("{message}")]
    RateLimited {
        /// What was limited.
        message: String,
        /// Seconds until a retry can succeed.
        retry_after: u64,
    },
    /// The storage failed; nothing was written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result type of domain operations.
pub type DomainResult<T> = Result<T, DomainError>;

/// The result of a write that may be a replay of an earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// Done now.
    Fresh(T),
    /// Done before under the same `Idempotency-Key`: the first answer.
    Replayed(StoredResponse),
}

/// An `Idempotency-Key` with the fingerprint of the request it came with.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    /// The key.
    pub key: String,
    /// Hash of what makes the request what it is (method, path, body).
    pub fingerprint: String,
}

/// Idempotency for a call whose answer is a message: the key and how to render the answer
/// that will be replayed (the domain does not know the wire format).
pub struct Idem<'a> {
    /// The key and fingerprint.
    pub key: IdempotencyKey,
    /// Renders the answer to store with the write.
    pub render: &'a (dyn Fn(&MessageRow) -> StoredResponse + Sync),
}

/// The time source: the system clock, or a manual one for deterministic tests.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// Wall-clock time.
    #[default]
    System,
    /// A clock that moves only when told to.
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// A manual clock starting at `ms`.
    pub fn manual(ms: i64) -> Self {
        Clock::Manual(Arc::new(AtomicI64::new(ms)))
    }

    /// Now, in milliseconds since the epoch.
    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .unwrap_or(0),
            Clock::Manual(ms) => ms.load(Ordering::SeqCst),
        }
    }

    /// Moves a manual clock forward (no effect on the system clock).
    pub fn advance(&self, by: Duration) {
        if let Clock::Manual(ms) = self {
            ms.fetch_add(i64::try_from(by.as_millis()).unwrap_or(0), Ordering::SeqCst);
        }
    }
}

/// Settings of the domain rules.
#[derive(Debug, Clone)]
pub struct DomainConfig {
    /// How long an agent stays online after `agentOnlinePing`.
    pub presence_window: Duration,
    /// How long an `Idempotency-Key` is honoured.
    pub idempotency_retention: Duration,
    /// If set, requests must carry this `partner-key`.
    pub partner_key: Option<String>,
    /// How long a verified API key is trusted without asking the database again (a revoked
    /// key stops working within this time).
    pub key_cache_ttl: Duration,
    /// A chat ends after this long without a (not pushed) message.
    pub chat_timeout: Duration,
    /// Messages a visitor may send per minute (0: unlimited) ...
    pub visitor_messages_per_minute: u32,
    /// ... and at once.
    pub visitor_burst: u32,
    /// Longest visitor message, in characters.
    pub visitor_max_text: usize,
    /// New visitor sessions per minute from one client address (0: unlimited).
    pub sessions_per_minute: u32,
    /// How long a chat must be quiet before its new messages go out in a fragment.
    pub fragment_delay: Duration,
    /// Refuse webhook URLs that point at private, loopback or link-local addresses.
    pub webhook_block_private: bool,
}

impl Default for DomainConfig {
    fn default() -> Self {
        Self {
            presence_window: Duration::from_secs(150),
            idempotency_retention: Duration::from_secs(24 * 3600),
            partner_key: None,
            key_cache_ttl: Duration::from_secs(5),
            chat_timeout: Duration::from_secs(30 * 60),
            visitor_messages_per_minute: 30,
            visitor_burst: 10,
            visitor_max_text: 10_000,
            sessions_per_minute: 60,
            fragment_delay: Duration::from_secs(10),
            webhook_block_private: false,
        }
    }
}

const KEY_CACHE_MAX: usize = 10_000;

/// The domain service: every operation of switchboard, over a [`Store`].
pub struct Domain {
    store: Arc<dyn Store>,
    config: DomainConfig,
    clock: Clock,
    /// key hash -> (account id, verified at)
    key_cache: RwLock<HashMap<[u8; 32], (String, Instant)>>,
    widgets: widget::WidgetCache,
    visitor_limiter: widget::RateLimiter,
    session_limiter: widget::RateLimiter,
}

/// A newly created API key; `key` is shown once and never stored.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// The stored record.
    pub record: ApiKey,
    /// The secret key.
    pub key: String,
}

/// What start-up did to the database.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// The default account.
    pub account: Account,
    /// A key created because the database was new and no key was given: print it once.
    pub new_key: Option<String>,
}

impl Domain {
    /// A domain service over `store`.
    pub fn new(store: Arc<dyn Store>, config: DomainConfig, clock: Clock) -> Self {
        Self {
            visitor_limiter: widget::RateLimiter::new(
                config.visitor_messages_per_minute,
                config.visitor_burst,
            ),
            session_limiter: widget::RateLimiter::new(
                config.sessions_per_minute,
                config.sessions_per_minute.max(1),
            ),
            widgets: std::sync::Mutex::new(HashMap::new()),
            store,
            config,
            clock,
            key_cache: RwLock::new(HashMap::new()),
        }
    }

    /// The store (for shutdown and tests).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    // --- accounts and keys -------------------------------------------------------------

    /// Ensures the default account exists. With `api_key`, registers that key for it (if
    /// it is not registered yet); without, creates and returns a key when the account is new.
    pub async fn bootstrap(&self, api_key: Option<&str>) -> DomainResult<Bootstrap> {
        let now = self.now();
        let (account, created) = self.store.ensure_default_account("default", now).await?;
        let mut new_key = None;
        match api_key {
            Some(key) => {
                let key = key.trim();
                if key.is_empty() {
                    return Err(DomainError::Missing("SWITCHBOARD_API_KEY is empty".into()));
                }
                if self
                    .store
                    .account_for_key(&ids::hash_key(key))
                    .await?
                    .is_none()
                {
                    self.register_key(&account.id, key, "SWITCHBOARD_API_KEY")
                        .await?;
                }
            }
            None if created => {
                let created = self.create_key(&account.id, "default").await?;
                new_key = Some(created.key);
            }
            None => {}
        }
        Ok(Bootstrap { account, new_key })
    }

    async fn register_key(&self, account_id: &str, key: &str, name: &str) -> DomainResult<ApiKey> {
        let record = ApiKey {
            id: ids::new_id(),
            account_id: account_id.to_owned(),
            name: name.to_owned(),
            prefix: ids::key_prefix(key),
            created_at: self.now(),
            revoked_at: None,
        };
        match self
            .store
            .create_api_key(&record, &ids::hash_key(key))
            .await
        {
            Ok(()) => Ok(record),
            Err(StoreError::Conflict(_)) => Err(DomainError::Duplicate(
                "this API key is already registered".into(),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates an account and its first key.
    pub async fn create_account(&self, name: &str) -> DomainResult<(Account, CreatedKey)> {
        let name = name.trim();
        if name.is_empty() {
            return Err(DomainError::Missing(
                "account name must not be empty".into(),
            ));
        }
        let account = self
            .store
            .create_account(&ids::new_id(), name, self.now())
            .await?;
        let key = self.create_key(&account.id, "default").await?;
        Ok((account, key))
    }

    /// All accounts.
    pub async fn list_accounts(&self) -> DomainResult<Vec<Account>> {
        Ok(self.store.list_accounts().await?)
    }

    /// The account with this id, or the default account when `id` is `None`.
    pub async fn resolve_account(&self, id: Option<&str>) -> DomainResult<Account> {
        match id {
            Some(id) => self
                .store
                .account(id)
                .await?
                .ok_or_else(|| DomainError::NotFound(format!("account {id} does not exist"))),
            None => Ok(self
                .store
                .ensure_default_account("default", self.now())
                .await?
                .0),
        }
    }

    /// Creates a new random key for an account.
    pub async fn create_key(&self, account_id: &str, name: &str) -> DomainResult<CreatedKey> {
        let key = ids::new_api_key();
        let record = self.register_key(account_id, &key, name).await?;
        Ok(CreatedKey { record, key })
    }

    /// Keys of an account.
    pub async fn list_keys(&self, account_id: &str) -> DomainResult<Vec<ApiKey>> {
        Ok(self.store.list_api_keys(account_id).await?)
    }

    /// Revokes a key by its id.
    pub async fn revoke_key(&self, account_id: &str, key_id: &str) -> DomainResult<()> {
        if self
            .store
            .revoke_api_key(account_id, key_id, self.now())
            .await?
        {
            // Forget cached verifications so the revocation takes effect here at once.
            self.key_cache
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            Ok(())
        } else {
            Err(DomainError::NotFound(format!(
                "no active key {key_id} in this account"
            )))
        }
    }

    /// The account an `api-key` (and `partner-key`, when one is configured) belongs to.
    pub async fn authenticate(
        &self,
        api_key: Option<&str>,
        partner_key: Option<&str>,
    ) -> DomainResult<String> {
        if let Some(expected) = &self.config.partner_key {
            let given = partner_key.unwrap_or_default();
            if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
                return Err(DomainError::Unauthorized(
                    "partner-key is missing or wrong: this server requires the configured partner-key header".into(),
                ));
            }
        }
        let key = match api_key.map(str::trim) {
            Some(k) if !k.is_empty() => k,
            _ => {
                return Err(DomainError::Unauthorized(
                    "api-key header is missing: send your API key in the `api-key` header".into(),
                ))
            }
        };
        let digest = ids::key_digest(key);
        {
            let cache = self.key_cache.read().unwrap_or_else(|e| e.into_inner());
            if let Some((account, at)) = cache.get(&digest) {
                if at.elapsed() < self.config.key_cache_ttl {
                    return Ok(account.clone());
                }
            }
        }
        let hash = hex::encode(digest);
        match self.store.account_for_key(&hash).await? {
            Some((account, stored_hash))
                if constant_time_eq(stored_hash.as_bytes(), hash.as_bytes()) =>
            {
                let mut cache = self.key_cache.write().unwrap_or_else(|e| e.into_inner());
                if cache.len() >= KEY_CACHE_MAX {
                    cache.clear();
                }
                cache.insert(digest, (account.clone(), Instant::now()));
                Ok(account)
            }
            _ => Err(DomainError::Unauthorized(
                "Key not found: the api-key does not match any active key".into(),
            )),
        }
    }

    // --- agents and groups -------------------------------------------------------------

    /// Adds an agent.
    pub async fn add_agent(
        &self,
        account_id: &str,
        name: &str,
        email: Option<&str>,
        userpic: Option<&str>,
        groups: &[String],
    ) -> DomainResult<(AgentRow, Vec<String>)> {
        let name = parse_name("name", Some(name))?;
        let email = email.map(|e| parse_email("email", e)).transpose()?;
        let userpic = userpic
            .map(|u| parse_label("userpic", u, 2048))
            .transpose()?;
        for g in groups {
            if self.store.group(account_id, g).await?.is_none() {
                return Err(DomainError::Invalid(format!(
                    "group {g} does not exist in this account"
                )));
            }
        }
        let agent = NewAgent {
            id: ids::new_id(),
            name,
            email,
            userpic,
            groups: groups.to_vec(),
            is_dummy: false,
            created_at: self.now(),
        };
        match self.store.create_agent(account_id, &agent).await {
            Ok(row) => Ok((row, agent.groups)),
            Err(StoreError::Conflict(what)) => Err(DomainError::Duplicate(format!(
                "{what} already exists in this account"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Agents of an account with their groups.
    pub async fn list_agents(
        &self,
        account_id: &str,
    ) -> DomainResult<Vec<(AgentRow, Vec<String>)>> {
        Ok(self.store.list_agents(account_id).await?)
    }

    /// Removes an agent. Messages keep the sender as it was.
    pub async fn remove_agent(&self, account_id: &str, id: &str) -> DomainResult<()> {
        if self.store.remove_agent(account_id, id).await? {
            Ok(())
        } else {
            Err(DomainError::NotFound(format!("agent {id} does not exist")))
        }
    }

    /// Whether an agent is online now.
    pub fn is_online(&self, agent: &AgentRow) -> bool {
        agent.online_until > self.now()
    }

    /// Adds a group.
    pub async fn add_group(&self, account_id: &str, name: &str) -> DomainResult<GroupRow> {
        let group = GroupRow {
            id: ids::new_id(),
            account_id: account_id.to_owned(),
            name: parse_name("name", Some(name))?,
            created_at: self.now(),
        };
        match self.store.create_group(&group).await {
            Ok(()) => Ok(group),
            Err(StoreError::Conflict(what)) => Err(DomainError::Duplicate(format!(
                "{what} already exists in this account"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Groups of an account.
    pub async fn list_groups(&self, account_id: &str) -> DomainResult<Vec<GroupRow>> {
        Ok(self.store.list_groups(account_id).await?)
    }

    /// Removes a group; its visitors lose their group, its agents stay.
    pub async fn remove_group(&self, account_id: &str, id: &str) -> DomainResult<()> {
        if self.store.remove_group(account_id, id).await? {
            Ok(())
        } else {
            Err(DomainError::NotFound(format!("group {id} does not exist")))
        }
    }

    /// The agent a message or ping names: by id (must exist), or by email (created as a
    /// "dummy agent" when unknown and a name is given).
    async fn resolve_agent(
        &self,
        account_id: &str,
        agent: &AgentRef,
    ) -> DomainResult<Arc<AgentRow>> {
        match agent {
            AgentRef::Id(id) => self.store.agent(account_id, id).await?.ok_or_else(|| {
                DomainError::Invalid(format!(
                    "agentId {id} does not match any agent of this account"
                ))
            }),
            AgentRef::Email { email, name } => {
                if let Some(a) = self.store.agent_by_email(account_id, email).await? {
                    return Ok(a);
                }
                let Some(name) = name else {
                    return Err(DomainError::Missing(format!(
                        "agentName is required: no agent has the email {email} yet, and \
                         switchboard needs a name to create it"
                    )));
                };
                let agent = NewAgent {
                    id: ids::new_id(),
                    name: name.clone(),
                    email: Some(email.clone()),
                    userpic: None,
                    groups: Vec::new(),
                    is_dummy: true,
                    created_at: self.now(),
                };
                Ok(Arc::new(
                    self.store
                        .agent_by_email_or_create(account_id, &agent)
                        .await?,
                ))
            }
        }
    }

    /// `agentOnlinePing`: the agent is online for the presence window from now.
    pub async fn agent_online_ping(
        &self,
        account_id: &str,
        agent: &AgentRef,
        idem: Option<IdempotencyKey>,
    ) -> DomainResult<Outcome<()>> {
        let row = self.resolve_agent(account_id, agent).await?;
        let now = self.now();
        let until = now + duration_ms(self.config.presence_window);
        let rec = idem.map(|k| {
            self.idem_record(
                k,
                StoredResponse {
                    status: 201,
                    body: String::new(),
                },
            )
        });
        match self
            .store
            .set_agent_online_until(account_id, &row.id, until, rec)
            .await?
        {
            Guarded::Applied(true) => Ok(Outcome::Fresh(())),
            Guarded::Applied(false) => Err(DomainError::Invalid(format!(
                "agent {} was removed while it was being marked online",
                row.id
            ))),
            Guarded::Replayed(r) => Ok(Outcome::Replayed(r)),
            Guarded::KeyReused => Err(key_reused()),
        }
    }

    fn idem_record(&self, key: IdempotencyKey, response: StoredResponse) -> IdempotencyRecord {
        IdempotencyRecord {
            key: key.key,
            fingerprint: key.fingerprint,
            response,
            now: self.now(),
            retention_ms: duration_ms(self.config.idempotency_retention),
        }
    }

    // --- messages ----------------------------------------------------------------------

    /// `POST /conversations/messages`: a message from an agent to a visitor.
    pub async fn send_agent_message(
        &self,
        account_id: &str,
        input: AgentMessage,
        idem: Option<Idem<'_>>,
    ) -> DomainResult<Outcome<Arc<MessageRow>>> {
        let agent = self.resolve_agent(account_id, &input.agent).await?;
        let agent_name = match &input.agent {
            // A name given with the email is how the integration shows this agent.
            AgentRef::Email { name: Some(n), .. } => n.clone(),
            _ => agent.name.clone(),
        };
        let row = self.new_message(
            account_id,
            &input.visitor_id,
            input.text,
            MessageKind::Agent {
                agent: &agent,
                agent_name,
                pushed: false,
            },
        );
        let row = MessageRow {
            received_from: input.received_from,
            ..row
        };
        self.insert(row, idem).await
    }

    /// `POST /conversations/pushedMessages`: an automated message, sent as a chosen agent.
    pub async fn push_message(
        &self,
        account_id: &str,
        input: PushedMessage,
        idem: Option<Idem<'_>>,
    ) -> DomainResult<Outcome<Arc<MessageRow>>> {
        let now = self.now();
        let agent = match (&input.agent_id, &input.group_id) {
            (Some(id), _) => {
                self.resolve_agent(account_id, &AgentRef::Id(id.clone()))
                    .await?
            }
            (None, Some(group)) => {
                if self.store.group(account_id, group).await?.is_none() {
                    return Err(DomainError::Invalid(format!(
                        "groupId {group} does not match any group of this account"
                    )));
                }
                self.store
                    .pick_agent(account_id, Some(group), now)
                    .await?
                    .map(Arc::new)
                    .ok_or_else(|| {
                        DomainError::Invalid(format!(
                            "group {group} has no agents to send this pushed message as; \
                             add an agent to the group or pass agentId"
                        ))
                    })?
            }
            (None, None) => self
                .store
                .pick_agent(account_id, None, now)
                .await?
                .map(Arc::new)
                .ok_or_else(|| {
                    DomainError::Invalid(
                        "this account has no agents to send a pushed message as; create one \
                     (switchboard agents add) or pass agentId"
                            .into(),
                    )
                })?,
        };
        let row = self.new_message(
            account_id,
            &input.visitor_id,
            input.text,
            MessageKind::Agent {
                agent: &agent,
                agent_name: agent.name.clone(),
                pushed: true,
            },
        );
        self.insert(row, idem).await
    }

    /// A message from the visitor (used by the visitor API). It is missed when no agent of
    /// the account is online.
    pub async fn send_visitor_message(
        &self,
        account_id: &str,
        visitor_id: &VisitorId,
        text: Text,
    ) -> DomainResult<Arc<MessageRow>> {
        let online = self.store.any_agent_online(account_id, self.now()).await?;
        let row = self.new_message(
            account_id,
            visitor_id,
            text,
            MessageKind::Visitor { missed: !online },
        );
        match self.insert(row, None).await? {
            Outcome::Fresh(m) => Ok(m),
            Outcome::Replayed(_) => Err(DomainError::Invalid("unexpected replay".into())),
        }
    }

    fn new_message(
        &self,
        account_id: &str,
        visitor_id: &VisitorId,
        text: Text,
        kind: MessageKind<'_>,
    ) -> MessageRow {
        let now = self.now();
        let mut row = MessageRow {
            seq: 0,
            // Named by the store (see `Store::insert_message`), or by `insert` when an
            // idempotency record must hold the answer before the store sees the row.
            id: String::new(),
            account_id: account_id.to_owned(),
            conversation_id: String::new(),
            visitor_id: visitor_id.as_str().to_owned(),
            kind: String::new(),
            text: text.into_string(),
            agent_id: None,
            agent_name: None,
            agent_userpic: None,
            is_pushed: false,
            is_missed: false,
            is_missed_by_visitor: false,
            is_trigger: false,
            received_from: None,
            created_at: now,
            updated_at: now,
            deleted_at: None,
        };
        match kind {
            MessageKind::Agent {
                agent,
                agent_name,
                pushed,
            } => {
                row.kind = "agent".into();
                row.agent_id = Some(agent.id.clone());
                row.agent_name = Some(agent_name);
                row.agent_userpic = agent.userpic.clone();
                row.is_pushed = pushed;
            }
            MessageKind::Visitor { missed } => {
                row.kind = "visitor".into();
                row.is_missed = missed;
            }
        }
        row
    }

    async fn insert(
        &self,
        mut row: MessageRow,
        idem: Option<Idem<'_>>,
    ) -> DomainResult<Outcome<Arc<MessageRow>>> {
        if idem.is_some() && row.id.is_empty() {
            row.id = ids::new_id();
        }
        let rec = idem.map(|i| {
            let response = (i.render)(&row);
            self.idem_record(i.key, response)
        });
        match self.store.insert_message(row, rec).await? {
            Guarded::Applied(m) => Ok(Outcome::Fresh(m)),
            Guarded::Replayed(r) => Ok(Outcome::Replayed(r)),
            Guarded::KeyReused => Err(key_reused()),
        }
    }

    /// A live message; `pushed` selects which of the two id spaces is asked.
    pub async fn get_message(
        &self,
        account_id: &str,
        id: &str,
        pushed: bool,
    ) -> DomainResult<MessageRow> {
        match self.store.message(account_id, id).await? {
            Some(m) if m.is_pushed == pushed => Ok(m),
            _ => Err(not_found(id, pushed)),
        }
    }

    /// Replaces the text of an agent's message; id and creation time stay.
    pub async fn edit_message(
        &self,
        account_id: &str,
        id: &str,
        pushed: bool,
        text: Text,
    ) -> DomainResult<MessageRow> {
        let change = self
            .store
            .update_message_text(account_id, id, pushed, text.as_str(), self.now())
            .await?;
        change_result(change, id, pushed, "edited")
    }

    /// Deletes an agent's message.
    pub async fn delete_message(
        &self,
        account_id: &str,
        id: &str,
        pushed: bool,
    ) -> DomainResult<MessageRow> {
        let change = self
            .store
            .delete_message(account_id, id, pushed, self.now())
            .await?;
        change_result(change, id, pushed, "deleted")
    }

    /// `PUT /conversations/visitorGroup`: sets (or with `None` clears) a visitor's group.
    pub async fn set_visitor_group(
        &self,
        account_id: &str,
        visitor_id: &VisitorId,
        group_id: Option<&str>,
    ) -> DomainResult<()> {
        if let Some(g) = group_id {
            if self.store.group(account_id, g).await?.is_none() {
                return Err(DomainError::Invalid(format!(
                    "groupId {g} does not match any group of this account"
                )));
            }
        }
        self.store
            .set_visitor_group(account_id, visitor_id.as_str(), group_id, self.now())
            .await?
            .ok_or_else(|| {
                DomainError::NotFound(format!(
                    "visitor {} does not exist (a visitor exists once a message was sent to or by it)",
                    visitor_id.as_str()
                ))
            })
    }

    /// A page of a visitor's live messages, oldest first, and whether there are more in
    /// the direction asked. Cursors are message ids (a deleted message's id still works).
    pub async fn list_visitor_messages(
        &self,
        account_id: &str,
        visitor_id: &VisitorId,
        page: PageRequest,
    ) -> DomainResult<(Vec<MessageRow>, bool)> {
        let visitor = visitor_id.as_str();
        if !self.store.visitor_exists(account_id, visitor).await? {
            return Err(DomainError::NotFound(format!(
                "visitor {visitor} does not exist (a visitor exists once a message was sent to or by it)"
            )));
        }
        let position = |field: &'static str, id: String| async move {
            self.position_in(account_id, visitor, &id)
                .await?
                .ok_or_else(|| {
                    DomainError::Invalid(format!(
                        "{field} {id} is not a message of visitor {visitor}"
                    ))
                })
        };
        let window = match (page.before, page.after) {
            (Some(_), Some(_)) => {
                return Err(DomainError::Invalid(
                    "give before or after, not both".into(),
                ))
            }
            (Some(id), None) => Window::Before(position("before", id).await?),
            (None, Some(id)) => Window::After(position("after", id).await?),
            (None, None) => Window::Latest,
        };
        Ok(self
            .store
            .list_messages(account_id, visitor, window, page.limit)
            .await?)
    }

    /// The feed position of a message of this visitor (deleted ones included: they still
    /// mark a place); `None` if it is not one of the visitor's messages.
    async fn position_in(
        &self,
        account_id: &str,
        visitor_id: &str,
        message_id: &str,
    ) -> DomainResult<Option<i64>> {
        Ok(
            match self.store.message_position(account_id, message_id).await? {
                Some((seq, v)) if v == visitor_id => Some(seq),
                _ => None,
            },
        )
    }

    /// Forgets idempotency keys past their retention.
    pub async fn purge_expired_idempotency_keys(&self) -> DomainResult<u64> {
        let before = self.now() - duration_ms(self.config.idempotency_retention);
        Ok(self.store.purge_idempotency_keys(before).await?)
    }
}

enum MessageKind<'a> {
    Agent {
        agent: &'a AgentRow,
        agent_name: String,
        pushed: bool,
    },
    Visitor {
        missed: bool,
    },
}

fn key_reused() -> DomainError {
    DomainError::KeyReused(
        "this Idempotency-Key was already used with a different request; use a new key for a new request".into(),
    )
}

fn not_found(id: &str, pushed: bool) -> DomainError {
    let what = if pushed { "Pushed message" } else { "Message" };
    DomainError::NotFound(format!("{what} {} does not exist", shown(id)))
}

/// A client-given id as an error message shows it: at most 64 characters.
fn shown(id: &str) -> String {
    let mut shown: String = id.chars().take(64).collect();
    if shown.len() < id.len() {
        shown.push('…');
    }
    shown
}

fn change_result(
    change: MessageChange,
    id: &str,
    pushed: bool,
    verb: &str,
) -> DomainResult<MessageRow> {
    match change {
        MessageChange::Done(m) => Ok(*m),
        MessageChange::NotFound => Err(not_found(id, pushed)),
        MessageChange::NotAgentMessage => Err(DomainError::PermissionDenied(format!(
            "only agents' messages can be {verb}; message {id} was sent by the visitor"
        ))),
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The HTML form of a message text: escaped, with line breaks as `<br>`.
pub fn html_of(text: &str) -> std::borrow::Cow<'_, str> {
    // Most messages have nothing to escape: they are answered without a copy.
    let special = |b: &u8| matches!(b, b'&' | b'<' | b'>' | b'"' | b'\'' | b'\r' | b'\n');
    let Some(first) = text.bytes().position(|b| special(&b)) else {
        return std::borrow::Cow::Borrowed(text);
    };
    let mut out = String::with_capacity(text.len() + text.len() / 8 + 8);
    out.push_str(&text[..first]);
    let bytes = text.as_bytes();
    let mut i = first;
    // Every special character is ASCII, so the runs between them are whole UTF-8.
    while i < bytes.len() {
        let run = bytes[i..]
            .iter()
            .position(special)
            .map_or(bytes.len(), |p| i + p);
        out.push_str(&text[i..run]);
        if run == bytes.len() {
            break;
        }
        match bytes[run] {
            b'&' => out.push_str("&amp;"),
            b'<' => out.push_str("&lt;"),
            b'>' => out.push_str("&gt;"),
            b'"' => out.push_str("&quot;"),
            b'\'' => out.push_str("&#39;"),
            b'\r' if bytes.get(run + 1) == Some(&b'\n') => {
                out.push_str("<br>");
                i = run + 2;
                continue;
            }
            _ => out.push_str("<br>"),
        }
        i = run + 1;
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_and_breaks_lines() {
        assert_eq!(
            html_of("a<b> & \"c\" 'd'\nx\r\ny"),
            "a&lt;b&gt; &amp; &quot;c&quot; &#39;d&#39;<br>x<br>y"
        );
        assert_eq!(html_of("plain"), "plain");
        assert!(matches!(html_of("plain"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(html_of("\r\r\n\n"), "<br><br><br>");
        assert_eq!(html_of("é<ü>\u{1F600}&"), "é&lt;ü&gt;\u{1F600}&amp;");
        assert_eq!(html_of("x\r"), "x<br>");
        assert_eq!(html_of(""), "");
    }

    #[test]
    fn html_matches_a_char_by_char_escape() {
        fn by_chars(text: &str) -> String {
            let mut out = String::new();
            let mut chars = text.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '&' => out.push_str("&amp;"),
                    '<' => out.push_str("&lt;"),
                    '>' => out.push_str("&gt;"),
                    '"' => out.push_str("&quot;"),
                    '\'' => out.push_str("&#39;"),
                    '\r' => {
                        if chars.peek() == Some(&'\n') {
                            chars.next();
                        }
                        out.push_str("<br>");
                    }
                    '\n' => out.push_str("<br>"),
                    c => out.push(c),
                }
            }
            out
        }
        // Every string of up to four characters over an alphabet with each special
        // character, a multi-byte one and a plain one.
        let alphabet = ['&', '<', '>', '"', '\'', '\r', '\n', 'ß', 'a'];
        let mut texts = vec![String::new()];
        for _ in 0..4 {
            let longer: Vec<String> = texts
                .iter()
                .flat_map(|t| alphabet.iter().map(move |c| format!("{t}{c}")))
                .collect();
            texts.extend(longer);
            texts.sort();
            texts.dedup();
        }
        assert!(texts.len() > 7_000);
        for t in &texts {
            assert_eq!(html_of(t), by_chars(t), "text {t:?}");
        }
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = Clock::manual(1_000);
        assert_eq!(c.now_ms(), 1_000);
        c.advance(Duration::from_secs(2));
        assert_eq!(c.now_ms(), 3_000);
    }
}
