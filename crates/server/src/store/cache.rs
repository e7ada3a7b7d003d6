//! In-memory caches of the SQLite backend, which is the only writer of its file's
//! messages, so it can keep them coherent.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{AgentRow, MessageRow};

/// Recently read messages, by id, bounded in count (oldest out first). Edits and deletes
/// update it; new messages enter on their first read.
///
/// Coherence: the writer bumps a generation under the lock after every commit that changes
/// messages; a reader that missed remembers the generation before it read the database and
/// only caches its row if no commit happened meanwhile, so a stale row never enters.
pub struct MessageCache {
    inner: Mutex<MessageCacheInner>,
    capacity: usize,
}

struct MessageCacheInner {
    map: HashMap<String, Arc<MessageRow>>,
    order: VecDeque<String>,
    generation: u64,
}

impl MessageCache {
    /// A cache of at most `capacity` messages (0 disables it).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(MessageCacheInner {
                map: HashMap::new(),
                order: VecDeque::new(),
                generation: 0,
            }),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MessageCacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A cached live message of this account, and else the generation to pass to
    /// [`MessageCache::fill`] after reading the database.
    pub fn get(&self, account_id: &str, id: &str) -> Result<Option<Arc<MessageRow>>, u64> {
        let inner = self.lock();
        match inner.map.get(id) {
            Some(m) if m.account_id == account_id => Ok(Some(m.clone())),
            // Cached, but another account's: no such message for this caller.
            Some(_) => Ok(None),
            None => Err(inner.generation),
        }
    }

    /// Caches a row read from the database if nothing was committed since `generation`.
    pub fn fill(&self, generation: u64, row: &MessageRow) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        if inner.generation == generation {
            Self::put_locked(&mut inner, self.capacity, row.clone());
        }
    }

    /// After a commit: these rows are now current (deleted ones are dropped).
    pub fn committed<'a>(&self, rows: impl IntoIterator<Item = &'a MessageRow>) {
        let mut inner = self.lock();
        inner.generation += 1;
        for row in rows {
            if row.deleted_at.is_some() {
                inner.map.remove(&row.id);
            } else if self.capacity > 0 {
                Self::put_locked(&mut inner, self.capacity, row.clone());
            }
        }
    }

    fn put_locked(inner: &mut MessageCacheInner, capacity: usize, row: MessageRow) {
        let id = row.id.clone();
        if inner.map.insert(id.clone(), Arc::new(row)).is_none() {
            inner.order.push_back(id);
        }
        while inner.map.len() > capacity {
            match inner.order.pop_front() {
                Some(old) => {
                    inner.map.remove(&old);
                }
                None => break,
            }
        }
        // Ids removed by deletes linger in `order`; keep it from growing without bound.
        if inner.order.len() > capacity.saturating_mul(2) {
            let MessageCacheInner { map, order, .. } = inner;
            order.retain(|id| map.contains_key(id));
        }
    }
}

/// Agents by id and by email, trusted for a short time: other processes (the CLI) may
/// change agents, and this process's own changes clear it at once.
pub struct AgentCache {
    inner: Mutex<AgentCacheInner>,
    ttl: Duration,
}

/// Keyed by account, then by id or email, so that a lookup (every message names its agent)
/// hashes borrowed strings and allocates nothing.
#[derive(Default)]
struct AgentCacheInner {
    accounts: HashMap<String, AccountAgents>,
    /// Entries in all accounts, to bound the whole.
    len: usize,
}

#[derive(Default)]
struct AccountAgents {
    by_id: HashMap<String, AgentEntry>,
    by_email: HashMap<String, AgentEntry>,
}

/// What the database said and when: `None` means "known not to exist".
/// Shared: a hit hands out the row without copying its strings.
type AgentEntry = (Option<Arc<AgentRow>>, Instant);

const AGENT_CACHE_MAX: usize = 50_000;

/// How an agent is looked up.
#[derive(Clone, Copy, Debug)]
pub enum AgentBy<'a> {
    /// By agent id.
    Id(&'a str),
    /// By lower-cased email ([`email_key`]).
    Email(&'a str),
}

/// The form of an email that agents are looked up and kept unique by: trimmed and
/// lower-cased. Borrowed when it already is (the usual case), so a lookup allocates nothing.
pub fn email_key(email: &str) -> std::borrow::Cow<'_, str> {
    let trimmed = email.trim();
    if trimmed.is_ascii() && !trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Borrowed(trimmed)
    } else {
        std::borrow::Cow::Owned(trimmed.to_lowercase())
    }
}

impl AgentCache {
    /// A cache whose entries live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            inner: Mutex::new(AgentCacheInner::default()),
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AgentCacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh entry for the agent: `Some(None)` means "known not to exist".
    pub fn get(&self, account_id: &str, by: AgentBy<'_>) -> Option<Option<Arc<AgentRow>>> {
        let inner = self.lock();
        let agents = inner.accounts.get(account_id)?;
        let (row, at) = match by {
            AgentBy::Id(id) => agents.by_id.get(id)?,
            AgentBy::Email(key) => agents.by_email.get(key)?,
        };
        (at.elapsed() < self.ttl).then(|| row.clone())
    }

    /// The agent from the cache or else from `fetch` (a database read, made only on a
    /// miss), whose answer is then remembered.
    pub async fn get_or_fetch<F, Fut, E>(
        &self,
        account_id: &str,
        by: AgentBy<'_>,
        fetch: F,
    ) -> Result<Option<Arc<AgentRow>>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<AgentRow>, E>>,
    {
        if let Some(hit) = self.get(account_id, by) {
            return Ok(hit);
        }
        let row = fetch().await?.map(Arc::new);
        self.put(account_id, by, row.clone());
        Ok(row)
    }

    /// Remembers the answer for the agent.
    pub fn put(&self, account_id: &str, by: AgentBy<'_>, row: Option<Arc<AgentRow>>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut inner = self.lock();
        if inner.len >= AGENT_CACHE_MAX {
            inner.accounts.clear();
            inner.len = 0;
        }
        let AgentCacheInner { accounts, len } = &mut *inner;
        // Owned keys only here: a put follows a database read, never a cache hit.
        let agents = accounts.entry(account_id.to_owned()).or_default();
        let (map, key) = match by {
            AgentBy::Id(id) => (&mut agents.by_id, id),
            AgentBy::Email(key) => (&mut agents.by_email, key),
        };
        if map.insert(key.to_owned(), (row, Instant::now())).is_none() {
            *len += 1;
        }
    }

    /// Forgets everything (after this process changed agents).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.accounts.clear();
        inner.len = 0;
    }
}

/// The newest `online_until` of each account's agents, trusted for a short time (the CLI
/// may remove agents from another process); pings through this process extend it at once.
pub struct PresenceCache {
    inner: Mutex<HashMap<String, (i64, Instant)>>,
    ttl: Duration,
}

impl PresenceCache {
    /// A cache whose entries live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            inner: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (i64, Instant)>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The account's newest `online_until`, if known and fresh.
    pub fn get(&self, account_id: &str) -> Option<i64> {
        let inner = self.lock();
        let (until, at) = inner.get(account_id)?;
        (at.elapsed() < self.ttl).then_some(*until)
    }

    /// Remembers what the database said.
    pub fn put(&self, account_id: &str, until: i64) {
        if self.ttl.is_zero() {
            return;
        }
        let mut inner = self.lock();
        if inner.len() >= AGENT_CACHE_MAX {
            inner.clear();
        }
        inner.insert(account_id.to_owned(), (until, Instant::now()));
    }

    /// An agent of the account is online until `until` (a ping through this process).
    pub fn extend(&self, account_id: &str, until: i64) {
        let mut inner = self.lock();
        if let Some((known, _)) = inner.get_mut(account_id) {
            *known = (*known).max(until);
        }
    }

    /// Forgets everything (after this process changed agents).
    pub fn clear(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, text: &str) -> MessageRow {
        MessageRow {
            seq: 1,
            id: id.into(),
            account_id: "acc".into(),
            conversation_id: "c".into(),
            visitor_id: "v".into(),
            kind: "agent".into(),
            text: text.into(),
            agent_id: None,
            agent_name: None,
            agent_userpic: None,
            is_pushed: false,
            is_missed: false,
            is_missed_by_visitor: false,
            is_trigger: false,
            received_from: None,
            created_at: 1,
            updated_at: 1,
            deleted_at: None,
        }
    }

    #[test]
    fn a_read_that_raced_a_commit_is_not_cached() {
        let c = MessageCache::new(10);
        let generation = c.get("acc", "m1").unwrap_err();
        // The writer commits an edit while the reader was reading the old row.
        c.committed([&row("m1", "new")]);
        c.fill(generation, &row("m1", "old"));
        assert_eq!(c.get("acc", "m1").unwrap().unwrap().text, "new");
    }

    #[test]
    fn deletes_evict_and_other_accounts_see_nothing() {
        let c = MessageCache::new(10);
        c.committed([&row("m1", "a")]);
        assert!(c.get("other", "m1").unwrap().is_none());
        let mut gone = row("m1", "a");
        gone.deleted_at = Some(2);
        c.committed([&gone]);
        assert!(c.get("acc", "m1").is_err());
    }

    #[test]
    fn capacity_is_bounded() {
        let c = MessageCache::new(3);
        for i in 0..10 {
            c.committed([&row(&format!("m{i}"), "x")]);
        }
        assert!(c.get("acc", "m0").is_err());
        assert!(c.get("acc", "m9").unwrap().is_some());
        assert_eq!(c.lock().map.len(), 3);
        assert!(c.lock().order.len() <= 6);
    }

    fn agent(id: &str, account: &str) -> Arc<AgentRow> {
        Arc::new(AgentRow {
            id: id.into(),
            account_id: account.into(),
            name: "Liz".into(),
            email: Some("liz@example.com".into()),
            userpic: None,
            is_dummy: false,
            online_until: 0,
            created_at: 1,
        })
    }

    #[test]
    fn email_keys_are_trimmed_and_lower_cased_like_the_stored_ones() {
        for email in [
            "liz@example.com",
            " Liz@Example.COM ",
            "ÉLISE@exemple.fr",
            "a\u{2003}",
        ] {
            let key = email_key(email);
            assert_eq!(key, email.trim().to_lowercase(), "{email:?}");
        }
        assert!(matches!(
            email_key("liz@example.com"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn agents_are_kept_by_account_and_by_kind_of_key() {
        let c = AgentCache::new(Duration::from_secs(60));
        let a1 = agent("a1", "acc");
        c.put("acc", AgentBy::Id("a1"), Some(a1.clone()));
        c.put("acc", AgentBy::Email("liz@example.com"), None);
        let hit = c.get("acc", AgentBy::Id("a1")).unwrap().unwrap();
        assert!(Arc::ptr_eq(&hit, &a1), "a hit shares the row, no copy");
        // Known not to exist, which is not the same as not known.
        assert_eq!(c.get("acc", AgentBy::Email("liz@example.com")), Some(None));
        assert!(
            c.get("acc", AgentBy::Email("a1")).is_none(),
            "ids and emails apart"
        );
        assert!(
            c.get("other", AgentBy::Id("a1")).is_none(),
            "accounts apart"
        );
        c.clear();
        assert!(c.get("acc", AgentBy::Id("a1")).is_none());
        assert_eq!(c.lock().len, 0);
    }

    #[tokio::test]
    async fn a_fetch_runs_only_on_a_miss_and_only_its_answers_are_kept() {
        let c = AgentCache::new(Duration::from_secs(60));
        let calls = std::cell::Cell::new(0);
        let fetch = |answer: Result<Option<AgentRow>, &'static str>| {
            calls.set(calls.get() + 1);
            async move { answer }
        };
        let by = AgentBy::Id("a1");
        let failed = c.get_or_fetch("acc", by, || fetch(Err("down"))).await;
        assert_eq!(failed, Err("down"));
        assert!(c.get("acc", by).is_none(), "an error is not remembered");
        let row = (*agent("a1", "acc")).clone();
        let first = c.get_or_fetch("acc", by, || fetch(Ok(Some(row)))).await;
        let first = first.unwrap().unwrap();
        let again = c.get_or_fetch("acc", by, || fetch(Ok(None))).await;
        assert!(
            Arc::ptr_eq(&again.unwrap().unwrap(), &first),
            "a hit, not a fetch"
        );
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn agents_expire_and_the_cache_is_bounded() {
        let c = AgentCache::new(Duration::from_millis(1));
        c.put("acc", AgentBy::Id("a1"), Some(agent("a1", "acc")));
        std::thread::sleep(Duration::from_millis(5));
        assert!(c.get("acc", AgentBy::Id("a1")).is_none(), "expired");

        let c = AgentCache::new(Duration::from_secs(60));
        for i in 0..AGENT_CACHE_MAX + 10 {
            c.put("acc", AgentBy::Id(&format!("a{i}")), None);
        }
        assert!(c.lock().len <= AGENT_CACHE_MAX);
        let counted: usize = c.lock().accounts.values().map(|a| a.by_id.len()).sum();
        assert_eq!(counted, c.lock().len);
    }
}
