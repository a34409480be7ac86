//! The HTTP front (axum): publish, replay, plugin status and queries, WebSocket fan-out,
//! health. Every error is JSON: `{"error": "...", "field": "...", "index": n}`.
//!
//! `guard` (who may ask what: tokens, and the checks that keep other web pages out),
//! `error` (the JSON error answer), `events` (publish, replay), `plugins` (plugin admin
//! and queries), `live` (WebSocket, the live feed page, health, log status).

pub mod admin;
mod error;
mod events;
mod guard;
mod live;
mod operate;
mod plugins;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
    /// `/ready` says no past this many events in the Iggy spool.
    pub ready_max_spool_depth: u64,
    /// Each plugin's recent throughput and lag, for the admin page's charts.
    pub samples: Arc<admin::Samples>,
}

/// Every route, with Socket.IO's layer, behind the same-site guard (see `guard`). Every
/// route is registered through `utoipa_axum`'s `routes!` from its handler's
/// `#[utoipa::path]`, so the OpenAPI document (`GET /api/openapi.json`) and what is served
/// are made from the same list and cannot drift apart.
pub fn router(state: AppState, socketio: socketioxide::layer::SocketIoLayer) -> Router {
    let (router, document) = routes(&state).split_for_parts();
    let document = Arc::new(document.to_pretty_json().expect("the OpenAPI document serialises"));
    router
        .layer(axum::Extension(OpenApiJson(document)))
        .layer(socketio)
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard::same_site))
        .with_state(state)
}

/// The OpenAPI document, as served.
#[derive(Clone)]
struct OpenApiJson(Arc<String>);

/// `GET /api/openapi.json`: this host's routes, generated from its handlers.
#[utoipa::path(get, path = "/api/openapi.json", tag = "operate", responses((status = 200, description = "OpenAPI 3.1")))]
async fn openapi_json(axum::Extension(OpenApiJson(document)): axum::Extension<OpenApiJson>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document.as_str().to_owned())
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Owlery", description = "Runs WebAssembly consumer plugins over an event log. Socket.IO is served at /socket.io/ (not described here)."),
    modifiers(&BearerAuth)
)]
struct Document;

/// Tokens go in `Authorization: Bearer` (see the README's Authentication).
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build();
        components.add_security_scheme("bearer", SecurityScheme::Http(bearer));
    }
}

/// Every route, grouped by the scope it needs.
fn routes(state: &AppState) -> OpenApiRouter<AppState> {
    let scope = |scope: Scope| {
        axum::middleware::from_fn_with_state(state.clone(), move |s, r, n| guard::require(s, r, n, scope))
    };
    let publish = OpenApiRouter::new()
        .routes(routes!(events::publish))
        .route_layer(scope(Scope::Publish))
        .route_layer(axum::middleware::from_fn(operate::count_publish));
    let metrics = OpenApiRouter::new().routes(routes!(operate::metrics)).route_layer(scope(Scope::Metrics));
    let subscribe = OpenApiRouter::new().routes(routes!(live::websocket)).route_layer(scope(Scope::Subscribe));
    let query = OpenApiRouter::new().routes(routes!(plugins::query_plugin)).route_layer(scope(Scope::Query));
    // Only these take a component: the upload limit is theirs alone.
    let uploads = OpenApiRouter::new()
        .routes(routes!(plugins::plugin_status, plugins::upload_plugin, plugins::delete_plugin))
        .routes(routes!(plugins::start_shadow, plugins::discard_shadow))
        .layer(DefaultBodyLimit::max(state.max_upload));
    let admin = OpenApiRouter::new()
        .routes(routes!(events::replay))
        .routes(routes!(plugins::list_plugins))
        .merge(uploads)
        .routes(routes!(plugins::pause_plugin))
        .routes(routes!(plugins::resume_plugin))
        .routes(routes!(plugins::replay_plugin))
        .routes(routes!(plugins::promote_shadow))
        .routes(routes!(live::log_status))
        .routes(routes!(admin::chart))
        .route_layer(scope(Scope::Admin));
    OpenApiRouter::with_openapi(<Document as utoipa::OpenApi>::openapi())
        .routes(routes!(live::live_feed))
        .routes(routes!(live::demo_feed))
        .routes(routes!(live::health))
        .routes(routes!(operate::ready))
        .routes(routes!(admin::page))
        .routes(routes!(openapi_json))
        .merge(publish)
        .merge(metrics)
        .merge(subscribe)
        .merge(query)
        .merge(admin)
}
