//! The live side: the WebSocket endpoint, the live feed page, health and log status.

use axum::extract::{Query, State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::plugins::lag;
use super::{ApiError, AppState};
use crate::auth::{AuthError, Grant};
use crate::fanout::Resume;

/// The live incident feed (`examples/live-feed.html`), built into the binary.
#[utoipa::path(get, path = "/", tag = "live", responses((status = 200, description = "the live feed page (HTML)")))]
pub(super) async fn live_feed() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("../../../examples/live-feed.html"))
}

/// The same page at `/demo`.
#[utoipa::path(get, path = "/demo", tag = "live", responses((status = 200, description = "the live feed page (HTML)")))]
pub(super) async fn demo_feed() -> axum::response::Html<&'static str> {
    live_feed().await
}

#[utoipa::path(get, path = "/health", tag = "operate", responses((status = 200, description = "alive")))]
pub(super) async fn health(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(json!({"status": "ok", "log": state.backend, "plugins": state.plugins.list().len()}))
}

/// `GET /api/monitoring/iggy-status`: the log's connection, spool depth, partition
/// offsets, and each plugin's lag.
#[utoipa::path(get, path = "/api/monitoring/iggy-status", tag = "operate", responses((status = 200, description = "the log, the spool, the outbox, each plugin's consumer offsets"), (status = 503, description = "the log is unreachable")))]
pub(super) async fn log_status(State(state): State<AppState>) -> (StatusCode, axum::Json<Value>) {
    let mut status = state.log.status().await;
    let mut plugins = serde_json::Map::new();
    let list: Vec<_> = state.plugins.list().into_iter().map(|(plugin, _)| plugin).collect();
    for plugin in &list {
        let lag = lag(&state, plugin).await;
        plugins.insert(plugin.name.clone(), json!({"lag": lag, "offsets": plugin.offsets, "state": plugin.state}));
    }
    status["plugins"] = plugins.into();
    let store = state.store.clone();
    if let Ok(Ok((pending, set_aside))) = tokio::task::spawn_blocking(move || store.outbox_counts()).await {
        status["outbox"] = json!({"pending": pending, "setAside": set_aside});
    }
    let code = super::operate::seed_shape(&mut status, &list);
    (code, axum::Json(status))
}

#[derive(Deserialize)]
pub(super) struct WsParams {
    rooms: Option<String>,
    /// The last offset the client has (`-1`: send everything retained).
    since: Option<i64>,
    /// The epoch that offset is from (from the welcome frame).
    epoch: Option<u64>,
}

/// Bytes a WebSocket connection reserves for reading.
const IDLE_READ_BUFFER: usize = 4 << 10;
/// Bytes of frames gathered before a write to the socket (a flush writes them anyway).
const WRITE_BUFFER: usize = 16 << 10;

/// `GET /ws?rooms=a,b&since=N[&token=T]`: JSON text frames `{"room", "offset", "event"}`.
/// Every room asked for must be one the token may join (403 otherwise).
#[utoipa::path(get, path = "/ws", tag = "live", params(("rooms" = Option<String>, Query), ("since" = Option<i64>, Query), ("epoch" = Option<u64>, Query), ("token" = Option<String>, Query)), responses((status = 101, description = "WebSocket: JSON text frames"), (status = 403, description = "a room the token may not join"), (status = 429, description = "too many presence changes"), (status = 503, description = "max_clients connected")))]
pub(super) async fn websocket(
    State(state): State<AppState>,
    axum::Extension(grant): axum::Extension<Grant>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    Query(params): Query<WsParams>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let rooms: Vec<String> =
        params.rooms.unwrap_or_default().split(',').map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()).collect();
    if let Some(room) = rooms.iter().find(|r| !grant.may_join(r)) {
        return Err(AuthError::Room(room.clone()).into());
    }
    let limits = *state.hub.limits();
    if rooms.len() > limits.max_rooms {
        let message = format!("at most {} rooms per client (max_rooms_per_client)", limits.max_rooms);
        return Err(ApiError::bad_request(message).with("field", "rooms"));
    }
    let slot = state.hub.admit().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too many clients connected (max_clients); try again later")
    })?;
    let resume = match params.since {
        None => Resume::Live,
        Some(offset) if offset < 0 => Resume::All,
        Some(offset) => Resume::After { offset: offset as u64, epoch: params.epoch },
    };
    // Refused before the upgrade when its token made too many presence changes lately.
    let presence = state
        .hub
        .presence()
        .connect(&grant, peer.map(|p| p.0.0.ip()), "websocket", rooms.iter())
        .map_err(|e| ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()))?;
    let hub = state.hub.clone();
    // A client sends little (subscribe, unsubscribe): a 4 KiB read buffer, grown for a
    // bigger message, instead of tungstenite's 128 KiB reserved for each connection (an idle
    // connection cost 136 KB of resident memory with it, 10,000 of them 1.3 GB).
    let ws = ws
        .max_message_size(limits.max_message)
        .max_frame_size(limits.max_message)
        .read_buffer_size(IDLE_READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER);
    Ok(ws.on_upgrade(move |socket| hub.serve(socket, (grant, presence), rooms, resume, slot)))
}
