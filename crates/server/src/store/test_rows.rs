//! Rows the backends' unit tests write.

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::{MessageRow, NewAgent, Store, StoreError};

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

/// The body of each backend's `a_failing_job_in_a_batch_is_rolled_back_alone`: four valid
/// inserts, an agent that fails after its first statement (its group does not exist) and
/// an agent whose email is taken, queued while `hold` keeps the database's write lock on a
/// connection of its own, so that they commit in one batch once `release` lets go of it.
/// Each failing job must leave nothing behind and take nothing of the others with it.
/// `count` answers a `SELECT count(*)` on the backend's own pool.
pub(super) async fn failing_jobs_in_one_batch<C>(
    store: Arc<dyn Store>,
    hold: impl Future<Output = C>,
    release: impl FnOnce(C) -> BoxFuture<'static, ()>,
    count: impl Fn(&'static str) -> BoxFuture<'static, i64>,
) {
    let (account, _) = store.ensure_default_account("a", 1).await.unwrap();
    let acc = account.id;
    store
        .create_agent(&acc, &agent("taken", "taken@x.com", &[]))
        .await
        .unwrap();
    let blocker = hold.await;
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
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    release(blocker).await;

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
