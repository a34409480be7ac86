//! The HTTP front (axum): publish, replay, plugin status and queries, WebSocket fan-out,
//! health. Every error is JSON: `{"error": "...", "field": "...", "index": n}`.
//!
//! `guard` (who may ask what: tokens, and the checks that keep other web pages out),
//! `error` (the JSON error answer), `events` (publish, replay), `plugins` (plugin admin
//! and queries), `live` (WebSocket, the live feed page, health, log status).

mod error;
mod events;
mod guard;
mod live;
mod plugins;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::auth::{Auth, Scope};
use crate::fanout::Hub;
use crate::log::EventLog;
use crate::plugins::Plugins;
use crate::routing::Routing;

pub use error::ApiError;

/// Events accepted in one request at most.
pub const MAX_EVENTS_PER_REQUEST: usize = 10_000;

#[derive(Clone)]
pub struct AppState {
    pub auth: Arc<Auth>,
    pub log: Arc<dyn EventLog>,
    pub plugins: Arc<Plugins>,
    pub hub: Hub,
    pub routing: Arc<Routing>,
    pub backend: &'static str,
    /// Largest `.wasm` upload (`max_upload_mb`).
    pub max_upload: usize,
    /// For the outbox's counts in the status.
    pub store: Arc<crate::store::Store>,
    /// Topics a producer may name: the routing table's and `extra_topics`.
    pub producer_topics: Arc<[String]>,
}

/// Every route, with Socket.IO's layer, behind the same-site guard (see `guard`).
pub fn router(state: AppState, socketio: socketioxide::layer::SocketIoLayer) -> Router {
    let publish =
        Router::new()
            .route("/api/events", post(events::publish))
            .route_layer(axum::middleware::from_fn_with_state(state.clone(), |s, r, n| {
                guard::require(s, r, n, Scope::Publish)
            }));
    let subscribe = Router::new()
        .route("/ws", get(live::websocket))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), |s, r, n| {
            guard::require(s, r, n, Scope::Subscribe)
        }));
    let query = Router::new().route("/api/plugins/{name}/query", get(plugins::query_plugin)).route_layer(
        axum::middleware::from_fn_with_state(state.clone(), |s, r, n| guard::require(s, r, n, Scope::Query)),
    );
    let admin = Router::new()
        .route("/api/events/replay", get(events::replay))
        .route("/api/plugins", get(plugins::list_plugins))
        .route(
            "/api/plugins/{name}",
            get(plugins::plugin_status)
                .put(plugins::upload_plugin)
                .delete(plugins::delete_plugin)
                .layer(DefaultBodyLimit::max(state.max_upload)),
        )
        .route("/api/plugins/{name}/pause", post(plugins::pause_plugin))
        .route("/api/plugins/{name}/resume", post(plugins::resume_plugin))
        .route("/api/plugins/{name}/replay", post(plugins::replay_plugin))
        .route(
            "/api/plugins/{name}/shadow",
            post(plugins::start_shadow).delete(plugins::discard_shadow).layer(DefaultBodyLimit::max(state.max_upload)),
        )
        .route("/api/plugins/{name}/promote", post(plugins::promote_shadow))
        .route("/api/monitoring/iggy-status", get(live::log_status))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), |s, r, n| {
            guard::require(s, r, n, Scope::Admin)
        }));
    Router::new()
        .route("/", get(live::live_feed))
        .route("/demo", get(live::live_feed))
        .route("/health", get(live::health))
        .merge(publish)
        .merge(subscribe)
        .merge(query)
        .merge(admin)
        .layer(socketio)
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard::same_site))
        .with_state(state)
}
