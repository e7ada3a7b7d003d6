//! Rows the backends' unit tests write.

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::oneshot;

use super::{MessageRow, NewAgent, Store, StoreError, StoreResult};

/// An agent's message `id` to `visitor`, created at 1 ms.
pub(super) fn message(account: &str, id: &str, visitor: &str) -> MessageRow {
    MessageRow {
        id: id.into(),
        account_id: account.into(),
        visitor_id: visitor.into(),
        kind: "agent".into(),
        text: format!("text of {id}"),
        created_at: 1,
        updated_at: 1,
        ..MessageRow::default()
    }
}

/// An agent named like its id, in `groups`.
pub(super) fn agent(id: &str, email: &str, groups: &[&str]) -> NewAgent {
    NewAgent {
        id: id.into(),
        name: id.into(),
        email: Some(email.into()),
        userpic: None,
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        is_dummy: false,
        created_at: 1,
    }
}

/// A writer kept busy by a job of the test's own, so that the writes submitted meanwhile
/// queue up and are taken as one batch once it lets go: the way to put given writes in one
/// group commit without racing the writer.
pub(super) struct BusyWriter {
    go: oneshot::Sender<()>,
    job: tokio::task::JoinHandle<StoreResult<()>>,
    queued: Box<dyn Fn() -> usize + Send>,
}

impl BusyWriter {
    /// Occupies the writer: `occupy` submits a job that signals `started` when the writer
    /// runs it and then waits for `wait`; `queued` tells how many messages wait in the
    /// writer's channel. Returns once the job runs.
    pub(super) async fn start(
        occupy: impl FnOnce(
            oneshot::Sender<()>,
            oneshot::Receiver<()>,
        ) -> BoxFuture<'static, StoreResult<()>>,
        queued: impl Fn() -> usize + Send + 'static,
    ) -> Self {
        let (started, running) = oneshot::channel();
        let (go, wait) = oneshot::channel();
        let job = tokio::spawn(occupy(started, wait));
        running.await.expect("the writer runs the job");
        BusyWriter {
            go,
            job,
            queued: Box::new(queued),
        }
    }

    /// Lets go of the writer once `n` messages wait in its channel.
    pub(super) async fn release_when_queued(self, n: usize) {
        let queued = self.queued;
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while queued() < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the writes reach the writer's channel");
        self.go.send(()).expect("the job waits");
        self.job.await.unwrap().unwrap();
    }
}

/// The job that occupies a writer for [`BusyWriter::start`]: it signals `started` and waits
/// for `wait`, writing nothing. `C` is the backend's writer.
pub(super) fn waiting_job<C>(
    started: oneshot::Sender<()>,
    wait: oneshot::Receiver<()>,
) -> impl for<'c> FnOnce(&'c mut C) -> BoxFuture<'c, StoreResult<()>> + Send + 'static {
    move |_| {
        Box::pin(async move {
            let _ = started.send(());
            let _ = wait.await;
            Ok(())
        })
    }
}

/// The body of each backend's `a_failing_job_in_a_batch_is_rolled_back_alone`: four valid
/// inserts, an agent that fails after its first statement (its group does not exist) and
/// an agent whose email is taken, all in one batch (queued while `busy`, once started,
/// occupies the writer). Each failing job must leave nothing behind and take nothing of
/// the others with it. `count` answers a `SELECT count(*)` on the backend's own pool.
pub(super) async fn failing_jobs_in_one_batch(
    store: Arc<dyn Store>,
    busy: impl Future<Output = BusyWriter>,
    count: impl Fn(&'static str) -> BoxFuture<'static, i64>,
) {
    let (account, _) = store.ensure_default_account("a", 1).await.unwrap();
    let acc = account.id;
    store
        .create_agent(&acc, &agent("taken", "taken@x.com", &[]))
        .await
        .unwrap();
    let busy = busy.await;
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (s, acc) = (store.clone(), acc.clone());
        tasks.push(tokio::spawn(async move {
            s.insert_message(message(&acc, &format!("m{i}"), "v"), None)
                .await
                .map(|_| ())
        }));
    }
    let (s, a) = (store.clone(), acc.clone());
    let half = tokio::spawn(async move {
        s.create_agent(&a, &agent("half", "half@x.com", &["no-such-group"]))
            .await
            .map(|_| ())
    });
    let (s, a) = (store.clone(), acc.clone());
    let duplicate = tokio::spawn(async move {
        s.create_agent(&a, &agent("dup", "TAKEN@x.com", &[]))
            .await
            .map(|_| ())
    });
    busy.release_when_queued(6).await;

    for t in tasks {
        t.await.unwrap().expect("valid inserts commit");
    }
    assert!(half.await.unwrap().is_err());
    assert!(matches!(
        duplicate.await.unwrap(),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(count("SELECT count(*) FROM messages").await, 4);
    assert_eq!(
        count("SELECT count(*) FROM agents WHERE id = 'half'").await,
        0,
        "half-written agent left behind"
    );
    assert_eq!(count("SELECT count(*) FROM agents").await, 1);
    store.close().await;
}
