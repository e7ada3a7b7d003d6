//! Fan-out of committed changes to the streams connected to this process.
//!
//! The store's feed ([`crate::store::Store::take_feed`]) says what was committed, in commit
//! order; that is the one seam a multi-instance transport plugs into (a PostgreSQL backend
//! feeds it from LISTEN/NOTIFY). The [`Hub`] hands each change to the subscribers it
//! concerns through bounded buffers: a subscriber whose buffer is full is dropped and told
//! so (it resumes from its cursor), so a slow client never slows the others or holds memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::mpsc;

use crate::store::{FeedEvent, FeedReceiver};

/// Frames a subscriber may have waiting before it counts as too slow.
pub const DEFAULT_BUFFER: usize = 256;

/// Who a subscription listens to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Topic {
    Visitor(String, String),
    Account(String),
}

struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Arc<FeedEvent>>,
    lagged: Arc<AtomicBool>,
}

/// In-process fan-out of the feed.
pub struct Hub {
    topics: Mutex<HashMap<Topic, Vec<Subscriber>>>,
    next_id: AtomicU64,
    buffer: usize,
}

/// A live subscription; dropping it unsubscribes.
pub struct Subscription {
    /// Changes for this subscriber, in feed order. `None` once dropped by the hub (see
    /// [`Subscription::lagged`]) or when the hub stops.
    pub rx: mpsc::Receiver<Arc<FeedEvent>>,
    lagged: Arc<AtomicBool>,
    hub: Weak<Hub>,
    topic: Topic,
    id: u64,
}

impl Subscription {
    /// Whether the hub dropped this subscriber because its buffer was full.
    pub fn lagged(&self) -> bool {
        self.lagged.load(Ordering::SeqCst)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.remove(&self.topic, self.id);
        }
    }
}

impl Hub {
    /// A hub whose subscribers may have `buffer` changes waiting.
    pub fn new(buffer: usize) -> Arc<Self> {
        Arc::new(Self {
            topics: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            buffer: buffer.max(1),
        })
    }

    /// Delivers the feed until it ends.
    pub fn spawn(self: &Arc<Self>, mut feed: FeedReceiver) -> tokio::task::JoinHandle<()> {
        let hub = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(batch) = feed.recv().await {
                let Some(hub) = hub.upgrade() else { break };
                hub.dispatch(&batch);
            }
        })
    }

    /// The changes of one visitor's conversation.
    pub fn subscribe_visitor(self: &Arc<Self>, account_id: &str, visitor_id: &str) -> Subscription {
        self.subscribe(Topic::Visitor(account_id.to_owned(), visitor_id.to_owned()))
    }

    /// Every change of an account.
    pub fn subscribe_account(self: &Arc<Self>, account_id: &str) -> Subscription {
        self.subscribe(Topic::Account(account_id.to_owned()))
    }

    /// How many subscriptions are live (for tests and metrics).
    pub fn subscribers(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Topic, Vec<Subscriber>>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn subscribe(self: &Arc<Self>, topic: Topic) -> Subscription {
        let (tx, rx) = mpsc::channel(self.buffer);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .entry(topic.clone())
            .or_default()
            .push(Subscriber {
                id,
                tx,
                lagged: lagged.clone(),
            });
        Subscription {
            rx,
            lagged,
            hub: Arc::downgrade(self),
            topic,
            id,
        }
    }

    fn remove(&self, topic: &Topic, id: u64) {
        let mut topics = self.lock();
        if let Some(subs) = topics.get_mut(topic) {
            subs.retain(|s| s.id != id);
            if subs.is_empty() {
                topics.remove(topic);
            }
        }
    }

    /// Hands a committed batch to its subscribers; drops those that cannot keep up.
    pub fn dispatch(&self, batch: &[Arc<FeedEvent>]) {
        let mut topics = self.lock();
        if topics.is_empty() {
            // Nobody listens (the usual case for an API-only integration): skip building
            // two topic keys per change.
            return;
        }
        for event in batch {
            for topic in [
                Topic::Visitor(event.account_id.clone(), event.visitor_id.clone()),
                Topic::Account(event.account_id.clone()),
            ] {
                let Some(subs) = topics.get_mut(&topic) else {
                    continue;
                };
                subs.retain(|s| match s.tx.try_send(event.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        s.lagged.store(true, Ordering::SeqCst);
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                });
                if subs.is_empty() {
                    topics.remove(&topic);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EventKind;

    fn event(seq: i64, visitor: &str) -> Arc<FeedEvent> {
        Arc::new(FeedEvent {
            seq,
            kind: EventKind::MessageCreated,
            account_id: "a".into(),
            visitor_id: visitor.into(),
            conversation_id: "c".into(),
            message: None,
            chat: None,
        })
    }

    #[test]
    fn routes_by_visitor_and_account() {
        let hub = Hub::new(8);
        let mut v1 = hub.subscribe_visitor("a", "v1");
        let mut v2 = hub.subscribe_visitor("a", "v2");
        let mut acc = hub.subscribe_account("a");
        let mut other = hub.subscribe_account("b");
        hub.dispatch(&[event(1, "v1"), event(2, "v2")]);
        assert_eq!(v1.rx.try_recv().unwrap().seq, 1);
        assert!(v1.rx.try_recv().is_err());
        assert_eq!(v2.rx.try_recv().unwrap().seq, 2);
        assert_eq!(acc.rx.try_recv().unwrap().seq, 1);
        assert_eq!(acc.rx.try_recv().unwrap().seq, 2);
        assert!(other.rx.try_recv().is_err());
        drop(v1);
        assert_eq!(hub.subscribers(), 3);
    }

    #[test]
    fn a_full_buffer_drops_only_that_subscriber() {
        let hub = Hub::new(2);
        let mut slow = hub.subscribe_visitor("a", "v");
        let mut fast = hub.subscribe_visitor("a", "v");
        for seq in 1..=3 {
            hub.dispatch(&[event(seq, "v")]);
            assert_eq!(fast.rx.try_recv().unwrap().seq, seq);
        }
        assert!(slow.lagged());
        assert!(!fast.lagged());
        assert_eq!(slow.rx.try_recv().unwrap().seq, 1);
        assert_eq!(slow.rx.try_recv().unwrap().seq, 2);
        assert!(matches!(
            slow.rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        assert_eq!(hub.subscribers(), 1);
    }
}
