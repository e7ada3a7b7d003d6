//! The OpenAPI 3 document of everything switchboard serves, generated from the handlers'
//! annotations and the wire types, so it cannot drift from the code.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{hooks, v3, widget};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "switchboard",
        description = "A self-hosted live-chat server that speaks the Brevo Conversations API. \
            Paths under /v3/conversations are Brevo's, with Brevo's statuses and error body \
            {code, message}. Extensions Brevo lacks are marked as such in their descriptions.",
        license(name = "Apache-2.0")
    ),
    paths(
        v3::agent_online_ping,
        v3::send_message,
        v3::get_message,
        v3::edit_message,
        v3::delete_message,
        v3::push_message,
        v3::get_pushed,
        v3::edit_pushed,
        v3::delete_pushed,
        v3::visitor_group,
        v3::list_visitor_messages,
        v3::events,
        hooks::list_webhooks,
        hooks::create_webhook,
        hooks::get_webhook,
        hooks::update_webhook,
        hooks::delete_webhook,
        hooks::list_deliveries,
        hooks::get_delivery,
        hooks::replay,
        widget::start_session,
        widget::list_messages,
        widget::send_message,
        widget::mark_read,
        widget::socket,
        super::health,
        super::ready,
    ),
    components(schemas(switchboard_wire::StreamEvent)),
    modifiers(&Security),
    tags(
        (name = "Conversations", description = "Brevo's Conversations API"),
        (name = "Extensions", description = "switchboard extensions that Brevo lacks"),
        (name = "Widget", description = "switchboard's visitor API for a chat widget (an extension: Brevo's widget protocol is private). Authenticated by the account's public widget id and a visitor token (Authorization: Bearer), never by an api-key. Browser pages on other origins may call it: the server answers CORS preflights (--cors-origins, default any origin). See docs/realtime.md for the WebSocket frames.")
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api-key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "api-key",
                "An API key of the account (switchboard keys create). partner-key is accepted \
                 too and checked only when the server is configured with one.",
            ))),
        );
        components.add_security_scheme(
            "visitor-token",
            SecurityScheme::Http(utoipa::openapi::security::Http::new(
                utoipa::openapi::security::HttpAuthScheme::Bearer,
            )),
        );
    }
}

/// The document as JSON, built once.
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| ApiDoc::openapi().to_pretty_json().unwrap_or_default())
}

pub(super) async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document())
}
