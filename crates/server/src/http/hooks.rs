//! Webhook endpoints and their delivery log over the API (switchboard extension).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use switchboard_wire::{ErrorBody, Webhook, WebhookAttempt, WebhookDelivery, WebhookRequest};

use super::v3::query_error;
use super::{ApiResult, AppState, Auth, JsonBody};
use crate::domain::NewWebhook;
use crate::store::{AttemptRow, DeliveryRow, WebhookRow};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v3/conversations/webhooks",
            get(list_webhooks).post(create_webhook),
        )
        .route(
            "/v3/conversations/webhooks/{id}",
            get(get_webhook).put(update_webhook).delete(delete_webhook),
        )
        .route(
            "/v3/conversations/webhooks/{id}/deliveries",
            get(list_deliveries),
        )
        .route(
            "/v3/conversations/webhooks/{id}/deliveries/{eventId}",
            get(get_delivery),
        )
        .route(
            "/v3/conversations/webhooks/{id}/deliveries/{eventId}/replay",
            post(replay),
        )
}

/// The wire form of an endpoint; the secret only when asked.
pub fn webhook_wire(w: WebhookRow, with_secret: bool) -> Webhook {
    Webhook {
        events: w.events.split(',').map(str::to_owned).collect(),
        status: if w.failing_since.is_some() {
            "failing".into()
        } else {
            "ok".into()
        },
        id: w.id,
        url: w.url,
        description: w.description,
        enabled: w.enabled,
        secret: with_secret.then_some(w.secret),
        failing_since: w.failing_since,
        consecutive_failures: w.consecutive_failures,
        last_error: w.last_error,
        created_at: w.created_at,
    }
}

/// The wire form of a delivery.
pub fn delivery_wire(d: DeliveryRow, attempts: Option<Vec<AttemptRow>>) -> WebhookDelivery {
    WebhookDelivery {
        next_attempt_at: (d.status == "pending").then_some(d.next_attempt_at),
        event_id: d.event_id,
        event_name: d.kind,
        conversation_id: d.conversation_id,
        seq: d.event_seq,
        status: d.status,
        attempts: d.attempts,
        created_at: d.created_at,
        last_attempt_at: d.last_attempt_at,
        last_status: d.last_status,
        last_error: d.last_error,
        last_latency_ms: d.last_latency_ms,
        delivered_at: d.delivered_at,
        attempt_log: attempts.map(|a| {
            a.into_iter()
                .map(|a| WebhookAttempt {
                    attempt: a.attempt,
                    at: a.at,
                    status: a.status_code,
                    latency_ms: a.latency_ms,
                    error: a.error,
                })
                .collect()
        }),
    }
}

fn new_webhook(b: WebhookRequest) -> NewWebhook {
    NewWebhook {
        url: b.url,
        events: b.events,
        description: b.description,
        enabled: b.enabled,
    }
}

/// Lists the account's webhook endpoints (switchboard extension).
#[utoipa::path(
    get,
    path = "/v3/conversations/webhooks",
    tag = "Extensions",
    summary = "List webhook endpoints (switchboard extension)",
    responses(
        (status = 200, description = "The endpoints, without their secrets", body = Vec<Webhook>),
        (status = 401, description = "Missing or unknown api-key", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn list_webhooks(
    State(state): State<AppState>,
    Auth(account): Auth,
) -> ApiResult<Json<Vec<Webhook>>> {
    let rows = state.domain.list_webhooks(&account).await?;
    Ok(Json(
        rows.into_iter().map(|w| webhook_wire(w, false)).collect(),
    ))
}

/// Adds a webhook endpoint (switchboard extension).
#[utoipa::path(
    post,
    path = "/v3/conversations/webhooks",
    tag = "Extensions",
    summary = "Add a webhook endpoint (switchboard extension)",
    description = "Events: conversationStarted, conversationFragment, conversationTranscript (default: all). The answer holds the signing secret.",
    request_body = WebhookRequest,
    responses(
        (status = 201, description = "The endpoint, with its secret", body = Webhook),
        (status = 400, description = "Missing or invalid url or events", body = ErrorBody),
        (status = 401, description = "Missing or unknown api-key", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn create_webhook(
    State(state): State<AppState>,
    Auth(account): Auth,
    body: JsonBody<WebhookRequest>,
) -> ApiResult<(StatusCode, Json<Webhook>)> {
    let w = state
        .domain
        .add_webhook(&account, new_webhook(body.value))
        .await?;
    Ok((StatusCode::CREATED, Json(webhook_wire(w, true))))
}

/// One webhook endpoint, with its secret (switchboard extension).
#[utoipa::path(
    get,
    path = "/v3/conversations/webhooks/{id}",
    tag = "Extensions",
    summary = "Get a webhook endpoint (switchboard extension)",
    params(("id" = String, Path, description = "Endpoint id")),
    responses(
        (status = 200, description = "The endpoint", body = Webhook),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn get_webhook(
    State(state): State<AppState>,
    Auth(account): Auth,
    super::IdPath(id): super::IdPath,
) -> ApiResult<Json<Webhook>> {
    Ok(Json(webhook_wire(
        state.domain.webhook(&account, &id).await?,
        true,
    )))
}

/// Changes a webhook endpoint (switchboard extension).
#[utoipa::path(
    put,
    path = "/v3/conversations/webhooks/{id}",
    tag = "Extensions",
    summary = "Change a webhook endpoint (switchboard extension)",
    params(("id" = String, Path, description = "Endpoint id")),
    request_body = WebhookRequest,
    responses(
        (status = 200, description = "The endpoint", body = Webhook),
        (status = 400, description = "Invalid url or events", body = ErrorBody),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn update_webhook(
    State(state): State<AppState>,
    Auth(account): Auth,
    super::IdPath(id): super::IdPath,
    body: JsonBody<WebhookRequest>,
) -> ApiResult<Json<Webhook>> {
    let w = state
        .domain
        .update_webhook(&account, &id, new_webhook(body.value))
        .await?;
    Ok(Json(webhook_wire(w, false)))
}

/// Removes a webhook endpoint and its delivery log (switchboard extension).
#[utoipa::path(
    delete,
    path = "/v3/conversations/webhooks/{id}",
    tag = "Extensions",
    summary = "Remove a webhook endpoint (switchboard extension)",
    params(("id" = String, Path, description = "Endpoint id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn delete_webhook(
    State(state): State<AppState>,
    Auth(account): Auth,
    super::IdPath(id): super::IdPath,
) -> ApiResult<StatusCode> {
    state.domain.remove_webhook(&account, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Paging of the delivery log.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DeliveriesQuery {
    /// How many, 1 to 100 (default 50).
    limit: Option<u32>,
    /// Only deliveries of events before this `seq` (to page back).
    before: Option<i64>,
}

/// The delivery log of an endpoint, newest first (switchboard extension).
#[utoipa::path(
    get,
    path = "/v3/conversations/webhooks/{id}/deliveries",
    tag = "Extensions",
    summary = "Delivery log of a webhook endpoint (switchboard extension)",
    params(("id" = String, Path, description = "Endpoint id"), DeliveriesQuery),
    responses(
        (status = 200, description = "Deliveries, newest first", body = Vec<WebhookDelivery>),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn list_deliveries(
    State(state): State<AppState>,
    Auth(account): Auth,
    super::IdPath(id): super::IdPath,
    query: Result<Query<DeliveriesQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<WebhookDelivery>>> {
    let Query(q) = query.map_err(query_error)?;
    let rows = state
        .domain
        .webhook_deliveries(&account, &id, q.before, q.limit.unwrap_or(50))
        .await?;
    Ok(Json(
        rows.into_iter().map(|d| delivery_wire(d, None)).collect(),
    ))
}

/// One delivery with every attempt (switchboard extension).
#[utoipa::path(
    get,
    path = "/v3/conversations/webhooks/{id}/deliveries/{eventId}",
    tag = "Extensions",
    summary = "A delivery and its attempts (switchboard extension)",
    params(("id" = String, Path, description = "Endpoint id"), ("eventId" = String, Path, description = "Event id")),
    responses(
        (status = 200, description = "The delivery", body = WebhookDelivery),
        (status = 404, description = "No such endpoint or delivery", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn get_delivery(
    State(state): State<AppState>,
    Auth(account): Auth,
    super::IdPath((id, event_id)): super::IdPath<(String, String)>,
) -> ApiResult<Json<WebhookDelivery>> {
    let found = state
        .domain
        .webhook_delivery(&account, &id, &event_id)
        .await?;
    let attempts = state
        .domain
        .webhook_attempts(&account, &id, &event_id)
        .await?;
    Ok(Json(delivery_wire(found, Some(attempts))))
}

/// Sends an event to the endpoint again (switchboard extension).
#[utoipa::path(
    post,
    path = "/v3/conversations/webhooks/{id}/deliveries/{eventId}/replay",
    tag = "Extensions",
    summary = "Replay a delivery (switchboard extension)",
    description = "Makes the delivery pending again, due now, with the same event id and payload.",
    params(("id" = String, Path, description = "Endpoint id"), ("eventId" = String, Path, description = "Event id")),
    responses(
        (status = 202, description = "Queued"),
        (status = 404, description = "No such endpoint or delivery", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn replay(
    State(state): State<AppState>,
    Auth(account): Auth,
    super::IdPath((id, event_id)): super::IdPath<(String, String)>,
) -> ApiResult<StatusCode> {
    state
        .domain
        .replay_webhook(&account, &id, &event_id)
        .await?;
    Ok(StatusCode::ACCEPTED)
}
