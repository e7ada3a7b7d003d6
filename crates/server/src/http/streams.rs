//! Live streams: the visitor WebSocket and the account's Server-Sent Events.
//!
//! Both follow the same recipe, which is what makes a resume lose and repeat nothing:
//! subscribe to the hub first, then replay the feed from the database after the client's
//! cursor, then pass on live changes, skipping any at or below the last cursor sent.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use switchboard_wire::{StartPage, StreamEvent};
use tokio::sync::watch;

use super::v3::to_wire;
use super::AppState;
use crate::domain::VisitorAuth;
use crate::realtime::Subscription;
use crate::store::{EventKind, FeedEvent};

/// Settings of the live streams.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// How often the server pings a visitor socket.
    pub ping_interval: Duration,
    /// A visitor socket silent for this long is closed.
    pub idle_timeout: Duration,
    /// How often an SSE stream sends a keep-alive comment.
    pub keep_alive: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            keep_alive: Duration::from_secs(15),
        }
    }
}

/// Feed entries read per replay query.
const REPLAY_PAGE: u32 = 500;

/// The wire form of a feed entry; `account` adds the fields an account stream needs.
pub fn stream_event(e: &FeedEvent, account: bool) -> StreamEvent {
    let deleted = e.kind == EventKind::MessageDeleted;
    let chat = e.chat.as_ref();
    StreamEvent {
        event: e.kind.as_str().to_owned(),
        cursor: Some(e.seq),
        conversation_id: account.then(|| e.conversation_id.clone()),
        visitor_id: account.then(|| e.visitor_id.clone()),
        message: if deleted {
            None
        } else {
            e.message.as_deref().map(to_wire)
        },
        message_id: if deleted {
            e.message.as_ref().map(|m| m.id.clone())
        } else {
            None
        },
        chat_id: chat.map(|c| c.id.clone()),
        is_no_available_agent: (e.kind == EventKind::ConversationStarted)
            .then(|| chat.is_some_and(|c| c.no_agent_online)),
        conversation_start_page: match (e.kind, chat) {
            (EventKind::ConversationStarted, Some(c))
                if c.start_page_url.is_some() || c.start_page_title.is_some() =>
            {
                Some(StartPage {
                    link: c.start_page_url.clone(),
                    title: c.start_page_title.clone(),
                })
            }
            _ => None,
        },
    }
}

fn control(event: &str, cursor: Option<i64>) -> String {
    let e = StreamEvent {
        event: event.to_owned(),
        cursor,
        conversation_id: None,
        visitor_id: None,
        message: None,
        message_id: None,
        chat_id: None,
        is_no_available_agent: None,
        conversation_start_page: None,
    };
    serde_json::to_string(&e).unwrap_or_default()
}

fn text(e: &FeedEvent, account: bool) -> String {
    serde_json::to_string(&stream_event(e, account)).unwrap_or_default()
}

/// Sends a close frame and waits (briefly) for the client's, as the protocol asks: a
/// client still reading earlier frames then sees the reason instead of a reset.
async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// How long a closing socket waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What a client frame asks for.
enum ClientFrame {
    Ping,
}

fn parse_client_frame(raw: &str) -> Result<ClientFrame, (u16, &'static str)> {
    #[derive(serde::Deserialize)]
    struct Frame {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    let frame: Frame = serde_json::from_str(raw)
        .map_err(|_| (1007, "frames must be JSON objects like {\"type\":\"ping\"}"))?;
    match frame.kind.as_deref() {
        Some("ping") => Ok(ClientFrame::Ping),
        _ => Err((
            1003,
            "unknown frame type; the only client frame is {\"type\":\"ping\"}",
        )),
    }
}

/// Serves one visitor socket: replay after `resume` (if given), `ready`, then live.
pub async fn visitor_socket(
    mut socket: WebSocket,
    state: AppState,
    who: VisitorAuth,
    resume: Option<i64>,
) {
    let mut sub = state
        .hub
        .subscribe_visitor(&who.account_id, &who.visitor_id);
    let mut cursor = match resume {
        Some(c) => c,
        None => match state.domain.feed_head().await {
            Ok(h) => h,
            Err(_) => return close(&mut socket, 1011, "internal error").await,
        },
    };
    if resume.is_some() {
        loop {
            let page = state
                .domain
                .replay(&who.account_id, Some(&who.visitor_id), cursor, REPLAY_PAGE)
                .await;
            let Ok((events, reached)) = page else {
                return close(&mut socket, 1011, "internal error").await;
            };
            for e in &events {
                if socket
                    .send(Message::Text(text(e, false).into()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if reached == cursor {
                break;
            }
            cursor = reached;
        }
    }
    if socket
        .send(Message::Text(control("ready", Some(cursor)).into()))
        .await
        .is_err()
    {
        return;
    }
    live_visitor(
        socket,
        state.shutdown.clone(),
        &state.streams,
        &mut sub,
        cursor,
    )
    .await;
}

async fn live_visitor(
    mut socket: WebSocket,
    mut shutdown: watch::Receiver<bool>,
    config: &StreamConfig,
    sub: &mut Subscription,
    mut cursor: i64,
) {
    let mut ping = tokio::time::interval(config.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            event = sub.rx.recv() => match event {
                Some(e) => {
                    if e.seq <= cursor || !e.kind.for_visitor() {
                        continue;
                    }
                    cursor = e.seq;
                    if socket.send(Message::Text(text(&e, false).into())).await.is_err() {
                        return;
                    }
                }
                None if sub.lagged() => {
                    return close(&mut socket, 1008, "slow consumer: send buffer full").await;
                }
                None => return close(&mut socket, 1001, "server shutting down").await,
            },
            frame = socket.recv() => {
                let Some(Ok(frame)) = frame else { return };
                last_heard = Instant::now();
                match frame {
                    Message::Text(raw) => match parse_client_frame(raw.as_str()) {
                        Ok(ClientFrame::Ping) => {
                            if socket.send(Message::Text(control("pong", None).into())).await.is_err() {
                                return;
                            }
                        }
                        Err((code, reason)) => return close(&mut socket, code, reason).await,
                    },
                    Message::Binary(_) => {
                        return close(&mut socket, 1003, "binary frames are not supported").await;
                    }
                    Message::Close(_) => return,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= config.idle_timeout {
                    return close(&mut socket, 1000, "idle timeout").await;
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            _ = shutdown.changed() => {
                return close(&mut socket, 1001, "server shutting down").await;
            }
        }
    }
}

/// State of an account's SSE stream.
struct SseState {
    state: AppState,
    account: String,
    sub: Subscription,
    cursor: i64,
    replaying: bool,
    pending: std::collections::VecDeque<FeedEvent>,
    shutdown: watch::Receiver<bool>,
    done: bool,
}

/// The account's events as Server-Sent Events, after `resume` if given.
pub async fn account_events(
    state: AppState,
    account: String,
    resume: Option<i64>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, crate::domain::DomainError> {
    let sub = state.hub.subscribe_account(&account);
    let cursor = match resume {
        Some(c) => c,
        None => state.domain.feed_head().await?,
    };
    let keep_alive = state.streams.keep_alive;
    let st = SseState {
        shutdown: state.shutdown.clone(),
        state,
        account,
        sub,
        cursor,
        replaying: resume.is_some(),
        pending: Default::default(),
        done: false,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok(sse_event(&e)), st));
            }
            if st.replaying {
                match st
                    .state
                    .domain
                    .replay(&st.account, None, st.cursor, REPLAY_PAGE)
                    .await
                {
                    Ok((events, reached)) => {
                        if reached == st.cursor {
                            st.replaying = false;
                        }
                        st.cursor = reached;
                        st.pending.extend(events);
                    }
                    Err(_) => {
                        st.done = true;
                        return Some((
                            Ok(Event::default().event("error").data("internal error")),
                            st,
                        ));
                    }
                }
                continue;
            }
            tokio::select! {
                e = st.sub.rx.recv() => match e {
                    Some(e) => {
                        if e.seq > st.cursor {
                            st.cursor = e.seq;
                            return Some((Ok(sse_event(&e)), st));
                        }
                    }
                    None => {
                        st.done = true;
                        let why = if st.sub.lagged() {
                            "slow consumer: send buffer full; reconnect with Last-Event-ID"
                        } else {
                            "server shutting down"
                        };
                        return Some((Ok(Event::default().event("error").data(why)), st));
                    }
                },
                _ = st.shutdown.changed() => {
                    st.done = true;
                    return Some((Ok(Event::default().event("error").data("server shutting down")), st));
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive")))
}

fn sse_event(e: &FeedEvent) -> Event {
    Event::default()
        .id(e.seq.to_string())
        .event(e.kind.as_str())
        .data(text(e, true))
}
