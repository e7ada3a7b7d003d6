//! Rows the backends' unit tests write.

use super::{MessageRow, NewAgent};

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
