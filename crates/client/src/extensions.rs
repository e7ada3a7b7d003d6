//! Switchboard-only operations (not part of Brevo's API).

use crate::Client;

/// Operations that only switchboard offers (agents, groups, visitors, webhooks …);
/// obtained from [`Client::extensions`].
///
/// They are kept apart from [`Conversations`](crate::Conversations) so that code which
/// sticks to `client.conversations()` works unchanged against Brevo. No extension calls
/// exist yet; they will be added here as the server grows them.
#[derive(Debug, Clone, Copy)]
pub struct Extensions<'a> {
    client: &'a Client,
}

impl<'a> Extensions<'a> {
    pub(crate) fn new(client: &'a Client) -> Self {
        Self { client }
    }

    /// The client these calls go through.
    pub fn client(&self) -> &'a Client {
        self.client
    }
}
