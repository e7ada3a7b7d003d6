//! Switchboard-only operations (not part of Brevo's API).

use reqwest::Method;

use crate::client::{Call, Client, Replay};
use crate::path::with_id;
use crate::wire::MessagePage;
use crate::Result;

/// Operations that only switchboard offers; obtained from [`Client::extensions`].
///
/// They are kept apart from [`Conversations`](crate::Conversations) so that code which
/// sticks to `client.conversations()` works unchanged against Brevo. Calling one against
/// Brevo gives [`Error::NotFound`](crate::Error::NotFound) or another API error.
#[derive(Debug, Clone, Copy)]
pub struct Extensions<'a> {
    client: &'a Client,
}

/// Which page of a visitor's messages to fetch: the newest by default, or those just
/// before or after a message (by id).
///
/// ```
/// use switchboard_client::ListMessages;
/// let older = ListMessages::new().limit(20).before("eYBEm3gq3zc5ayE2g");
/// # let _ = older;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListMessages {
    limit: Option<u32>,
    before: Option<String>,
    after: Option<String>,
}

impl ListMessages {
    /// The newest messages, as many as the server's default page (50).
    pub fn new() -> Self {
        Self::default()
    }

    /// How many messages, 1 to 100.
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Only messages written before this one (to page backwards).
    pub fn before(mut self, message_id: impl Into<String>) -> Self {
        self.before = Some(message_id.into());
        self.after = None;
        self
    }

    /// Only messages written after this one (to page forwards or catch up).
    pub fn after(mut self, message_id: impl Into<String>) -> Self {
        self.after = Some(message_id.into());
        self.before = None;
        self
    }

    fn query(&self) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(limit) = self.limit {
            q.append_pair("limit", &limit.to_string());
        }
        if let Some(before) = &self.before {
            q.append_pair("before", before);
        }
        if let Some(after) = &self.after {
            q.append_pair("after", after);
        }
        q.finish()
    }
}

impl<'a> Extensions<'a> {
    pub(crate) fn new(client: &'a Client) -> Self {
        Self { client }
    }

    /// The client these calls go through.
    pub fn client(&self) -> &'a Client {
        self.client
    }

    /// A page of a visitor's messages, oldest first:
    /// `GET /conversations/visitors/{visitorId}/messages` → 200.
    ///
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> switchboard_client::Result<()> {
    /// use switchboard_client::ListMessages;
    /// let ext = client.extensions();
    /// let mut page = ext.list_visitor_messages("kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg", ListMessages::new()).await?;
    /// while page.has_more {
    ///     let first = page.messages[0].id.clone();
    ///     page = ext
    ///         .list_visitor_messages("kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg", ListMessages::new().before(first))
    ///         .await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_visitor_messages(
        &self,
        visitor_id: impl AsRef<str>,
        page: ListMessages,
    ) -> Result<MessagePage> {
        let mut path = with_id("/conversations/visitors", visitor_id.as_ref())?;
        path.push_str("/messages");
        let query = page.query();
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query);
        }
        self.client
            .execute(Call {
                op: "list_visitor_messages",
                method: Method::GET,
                path,
                body: None,
                replay: Replay::Safe,
                idempotency_key: None,
            })
            .await?
            .json()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_encoded_and_cursors_exclude_each_other() {
        assert_eq!(ListMessages::new().query(), "");
        assert_eq!(
            ListMessages::new().limit(5).after("a b&c").query(),
            "limit=5&after=a+b%26c"
        );
        assert_eq!(
            ListMessages::new().after("x").before("y").query(),
            "before=y"
        );
    }
}
