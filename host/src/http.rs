//! The HTTP front (axum): publish, replay, plugin status and queries, WebSocket fan-out,
//! health. Every error is JSON: `{"error": "...", "field": "...", "index": n}`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{Auth, AuthError, Grant, Scope};
use crate::envelope::{Envelope, Routing, check_topic};
use crate::fanout::{Hub, Resume};
use crate::log::{AppendItem, EventLog, LogError};
use crate::plugins::runner::{PluginStatus, ReplayFrom};
use crate::plugins::{Installed, PluginError, Plugins};

/// Events accepted in one request at most.
pub const MAX_EVENTS_PER_REQUEST: usize = 10_000;
/// Records returned by one replay request at most.
const MAX_REPLAY: usize = 10_000;

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
}

pub fn router(state: AppState) -> Router {
    let publish = Router::new()
        .route("/api/events", post(publish))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), |s, r, n| require(s, r, n, Scope::Publish)));
    let subscribe = Router::new()
        .route("/ws", get(websocket))
        .route("/api/plugins/{name}/query", get(query_plugin))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), |s, r, n| require(s, r, n, Scope::Subscribe)));
    let admin = Router::new()
        .route("/api/events/replay", get(replay))
        .route("/api/plugins", get(list_plugins))
        .route(
            "/api/plugins/{name}",
            get(plugin_status).put(upload_plugin).delete(delete_plugin).layer(DefaultBodyLimit::max(state.max_upload)),
        )
        .route("/api/plugins/{name}/pause", post(pause_plugin))
        .route("/api/plugins/{name}/resume", post(resume_plugin))
        .route("/api/plugins/{name}/replay", post(replay_plugin))
        .route(
            "/api/plugins/{name}/shadow",
            post(start_shadow).delete(discard_shadow).layer(DefaultBodyLimit::max(state.max_upload)),
        )
        .route("/api/plugins/{name}/promote", post(promote_shadow))
        .route("/api/monitoring/iggy-status", get(log_status))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), |s, r, n| require(s, r, n, Scope::Admin)));
    Router::new()
        .route("/", get(live_feed))
        .route("/demo", get(live_feed))
        .route("/health", get(health))
        .merge(publish)
        .merge(subscribe)
        .merge(admin)
        .with_state(state)
}

/// The bearer token of a request: `Authorization: Bearer T`, else `?token=T` (browsers
/// cannot set headers on a WebSocket).
fn presented_token(request: &axum::extract::Request) -> Option<String> {
    if let Some(value) = request.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return value.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    let axum::extract::Query(pairs) =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(request.uri()).ok()?;
    pairs.into_iter().find(|(key, _)| key == "token").map(|(_, value)| value)
}

/// Refuse the request unless its token grants `scope` (401 without a valid token, 403
/// without the scope); the grant goes on to the handler.
async fn require(
    State(state): State<AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
    scope: Scope,
) -> Response {
    let token = presented_token(&request);
    match state.auth.require(token.as_deref(), scope) {
        Ok(grant) => {
            request.extensions_mut().insert(grant);
            next.run(request).await
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let status = match e {
            AuthError::Missing | AuthError::Invalid(_) => StatusCode::UNAUTHORIZED,
            AuthError::Forbidden(_) | AuthError::Room(_) => StatusCode::FORBIDDEN,
        };
        ApiError::new(status, e.to_string())
    }
}

/// An error answer: status plus a JSON body naming the problem.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, body: json!({ "error": message.into() }) }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.body[key] = value.into();
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::NoSuchTopic(_) | LogError::NoSuchPartition { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, e.to_string())
            }
            LogError::Storage(_) | LogError::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
        }
    }
}

impl From<PluginError> for ApiError {
    fn from(e: PluginError) -> Self {
        let status = match e {
            _ if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
            PluginError::NotFound(_) => StatusCode::NOT_FOUND,
            PluginError::NotRunning(_) | PluginError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            PluginError::Failed { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            PluginError::NoShadow(_) | PluginError::ShadowBehind { .. } => StatusCode::CONFLICT,
            PluginError::BadManifest(_) => return ApiError::bad_request(e.to_string()).with("field", "manifest"),
            PluginError::BadName(_) | PluginError::BadComponent(_) | PluginError::NotStarted(_) => {
                return ApiError::bad_request(e.to_string()).with("field", "wasm");
            }
        };
        ApiError::new(status, e.to_string())
    }
}

/// The live incident feed (`examples/live-feed.html`), built into the binary.
async fn live_feed() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("../../examples/live-feed.html"))
}

async fn health(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(json!({"status": "ok", "log": state.backend, "plugins": state.plugins.list().len()}))
}

#[derive(Deserialize)]
struct PublishParams {
    topic: Option<String>,
}

/// `POST /api/events`: one envelope or an array. All are validated before any is appended.
async fn publish(
    State(state): State<AppState>,
    Query(params): Query<PublishParams>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("body is not valid JSON: {e}")).with("field", "(body)"))?;
    let (values, single) = match value {
        Value::Array(values) => (values, false),
        other => (vec![other], true),
    };
    if values.is_empty() {
        return Err(ApiError::bad_request("empty batch: send one event or a non-empty array").with("field", "(body)"));
    }
    if values.len() > MAX_EVENTS_PER_REQUEST {
        return Err(ApiError::bad_request(format!("at most {MAX_EVENTS_PER_REQUEST} events per request"))
            .with("field", "(body)"));
    }
    if let Some(topic) = &params.topic {
        check_topic(topic).map_err(|e| ApiError::bad_request(format!("topic: {e}")).with("field", "topic"))?;
    }
    let mut items = Vec::with_capacity(values.len());
    for (index, value) in values.into_iter().enumerate() {
        let envelope = Envelope::from_producer(value).map_err(|e| {
            let error = ApiError::bad_request(e.to_string()).with("field", e.field);
            if single { error } else { error.with("index", index) }
        })?;
        let topic = params.topic.clone().unwrap_or_else(|| state.routing.topic_for(&envelope.event_type).to_owned());
        items.push(AppendItem { topic, key: envelope.partition_key(), envelope });
    }
    let appended = state.log.append(items).await?;
    Ok((StatusCode::CREATED, axum::Json(json!({ "events": appended }))))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReplayParams {
    topic: Option<String>,
    partition: Option<u32>,
    #[serde(default)]
    from_offset: u64,
    limit: Option<usize>,
}

/// `GET /api/events/replay?topic=&fromOffset=&limit=[&partition=]`: stored envelopes in
/// offset order, per partition; `next` says where to continue.
async fn replay(
    State(state): State<AppState>,
    Query(params): Query<ReplayParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let topic = params.topic.ok_or_else(|| ApiError::bad_request("topic is required").with("field", "topic"))?;
    check_topic(&topic).map_err(|e| ApiError::bad_request(format!("topic: {e}")).with("field", "topic"))?;
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_REPLAY {
        return Err(ApiError::bad_request(format!("limit must be 1 to {MAX_REPLAY}")).with("field", "limit"));
    }
    let partitions = match params.partition {
        Some(p) => vec![p],
        None => (0..state.log.partitions(&topic).await?).collect(),
    };
    let mut records = Vec::new();
    let mut next = BTreeMap::new();
    for partition in partitions {
        let want = limit - records.len();
        let polled =
            if want == 0 { Vec::new() } else { state.log.poll(&topic, partition, params.from_offset, want).await? };
        next.insert(partition.to_string(), polled.last().map_or(params.from_offset, |r| r.offset + 1));
        for record in polled {
            let event: Value = serde_json::from_slice(&record.payload)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&record.payload).into_owned()));
            records.push(json!({"partition": record.partition, "offset": record.offset, "event": event}));
        }
    }
    Ok(axum::Json(json!({"topic": topic, "records": records, "next": next})))
}

/// Run a blocking plugin operation (compiling, joining a runner) off the async workers.
/// A `.wasm` body; one over `max_upload_mb` (or unreadable) is refused with the status
/// axum gives it (413 for too large) and a JSON error.
fn component_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        ApiError::new(rejection.status(), format!("the .wasm body: {}", rejection.body_text())).with("field", "wasm")
    })
}

/// Run a registry change of plugin `name` off the async workers (it compiles, starts and
/// stops runners, and touches files).
async fn change<T: Send + 'static>(
    state: &AppState,
    name: &str,
    operation: impl FnOnce(&Plugins, &str) -> Result<T, PluginError> + Send + 'static,
) -> Result<T, ApiError> {
    let (plugins, name) = (state.plugins.clone(), name.to_owned());
    let outcome = tokio::task::spawn_blocking(move || operation(&plugins, &name))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(outcome?)
}

async fn lag(state: &AppState, status: &PluginStatus) -> u64 {
    let mut lag = 0u64;
    for (tp, next) in status.offsets.iter() {
        if let Ok(high) = state.log.high_watermark(&tp.topic, tp.partition).await {
            lag += high.saturating_sub(next);
        }
    }
    lag
}

async fn plugin_json(state: &AppState, (status, shadow): (PluginStatus, Option<PluginStatus>)) -> Value {
    let mut value = serde_json::to_value(&status).expect("status serialises");
    value["lag"] = lag(state, &status).await.into();
    if let Some(shadow) = shadow {
        let shadow_lag = lag(state, &shadow).await;
        let mut shadow_value = serde_json::to_value(&shadow).expect("status serialises");
        shadow_value["lag"] = shadow_lag.into();
        shadow_value["caughtUp"] =
            (shadow_lag == 0 && shadow.state == crate::plugins::runner::RunState::Running).into();
        value["shadow"] = shadow_value;
    }
    value
}

async fn list_plugins(State(state): State<AppState>) -> axum::Json<Value> {
    let mut out = Vec::new();
    for status in state.plugins.list() {
        out.push(plugin_json(&state, status).await);
    }
    axum::Json(json!({ "plugins": out }))
}

async fn plugin_status(State(state): State<AppState>, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    let status = state.plugins.status(&name)?;
    Ok(axum::Json(plugin_json(&state, status).await))
}

#[derive(Deserialize)]
struct UploadParams {
    /// The manifest (TOML text); without it a plugin keeps the one it has.
    manifest: Option<String>,
}

/// `PUT /api/plugins/{name}?manifest=TOML` with the `.wasm` as the body: validated and
/// compiled before anything is replaced; then started, or swapped in keeping its offsets
/// and state, and saved in the plugins directory.
async fn upload_plugin(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(params): Query<UploadParams>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let body = component_body(body)?;
    let installed = change(&state, &name, move |p, name| p.upload(name, &body, params.manifest.as_deref())).await?;
    let (code, word) = match installed {
        Installed::Started => (StatusCode::CREATED, "started"),
        Installed::Swapped => (StatusCode::OK, "swapped"),
        Installed::Unchanged => (StatusCode::OK, "unchanged"),
    };
    let status = plugin_json(&state, state.plugins.status(&name)?).await;
    Ok((code, axum::Json(json!({"installed": word, "plugin": status}))))
}

/// The yes/no switches of the plugin routes (`?purge=true`, `?force=true`).
#[derive(Deserialize)]
struct Switches {
    #[serde(default)]
    purge: bool,
    #[serde(default)]
    force: bool,
}

/// `DELETE /api/plugins/{name}[?purge=true]`: stop it and delete its files; its offsets
/// and state stay (so adding it again resumes) unless `purge`.
async fn delete_plugin(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(params): Query<Switches>,
) -> Result<axum::Json<Value>, ApiError> {
    change(&state, &name, move |p, name| p.delete(name, params.purge)).await?;
    Ok(axum::Json(json!({"removed": name, "purged": params.purge})))
}

async fn pause_plugin(State(state): State<AppState>, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    state.plugins.pause(&name).await?;
    Ok(axum::Json(plugin_json(&state, state.plugins.status(&name)?).await))
}

async fn resume_plugin(State(state): State<AppState>, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    state.plugins.resume(&name).await?;
    Ok(axum::Json(plugin_json(&state, state.plugins.status(&name)?).await))
}

/// `POST /api/plugins/{name}/replay` with `{"from": 0}`, `{"offsets": {"topic": {"0": 5}}}`
/// or `{"timestamp": "2026-11-23T10:00:00Z"}` (an empty body means from 0).
async fn replay_plugin(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let request: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({"from": 0})
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("body is not valid JSON: {e}")))?
    };
    let from = replay_from(&request)?;
    state.plugins.replay(&name, from).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(plugin_json(&state, state.plugins.status(&name)?).await)))
}

fn replay_from(request: &Value) -> Result<ReplayFrom, ApiError> {
    if let Some(from) = request.get("from") {
        return match from.as_u64() {
            Some(0) => Ok(ReplayFrom::Start),
            Some(offset) => {
                // One offset for every partition of every topic is not meaningful across
                // partitions; only zero is accepted in this form.
                Err(ApiError::bad_request(format!(
                    "from: {offset} is not 0; give offsets per partition as \"offsets\""
                ))
                .with("field", "from"))
            }
            None => Err(ApiError::bad_request("from: must be 0").with("field", "from")),
        };
    }
    if let Some(offsets) = request.get("offsets") {
        let parsed: BTreeMap<String, BTreeMap<u32, u64>> = serde_json::from_value(offsets.clone()).map_err(|e| {
            ApiError::bad_request(format!("offsets: expected {{\"topic\": {{\"partition\": offset}}}}: {e}"))
                .with("field", "offsets")
        })?;
        return Ok(ReplayFrom::Offsets(parsed.into()));
    }
    if let Some(at) = request.get("timestamp") {
        let text = at
            .as_str()
            .ok_or_else(|| ApiError::bad_request("timestamp: must be a string").with("field", "timestamp"))?;
        let at = chrono::DateTime::parse_from_rfc3339(text).map_err(|e| {
            ApiError::bad_request(format!("timestamp: {text:?} is not RFC 3339: {e}")).with("field", "timestamp")
        })?;
        return Ok(ReplayFrom::Timestamp(at.with_timezone(&chrono::Utc)));
    }
    Err(ApiError::bad_request("give one of from (0), offsets or timestamp").with("field", "(body)"))
}

/// `POST /api/plugins/{name}/shadow?manifest=TOML` with a candidate `.wasm`: run it from
/// offset zero beside the live version, its broadcasts and publishes suppressed.
async fn start_shadow(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(params): Query<UploadParams>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let body = component_body(body)?;
    change(&state, &name, move |p, name| p.start_shadow(name, &body, params.manifest.as_deref())).await?;
    Ok((StatusCode::CREATED, axum::Json(plugin_json(&state, state.plugins.status(&name)?).await)))
}

async fn discard_shadow(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    change(&state, &name, |p, name| p.discard_shadow(name)).await?;
    Ok(axum::Json(plugin_json(&state, state.plugins.status(&name)?).await))
}

/// `POST /api/plugins/{name}/promote[?force=true]`: the shadow becomes the live version
/// with its state and offsets; 409 while it still lags (unless forced).
async fn promote_shadow(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(params): Query<Switches>,
) -> Result<axum::Json<Value>, ApiError> {
    let (_, shadow) = state.plugins.status(&name)?;
    let shadow = shadow.ok_or_else(|| ApiError::new(StatusCode::CONFLICT, format!("plugin {name:?} has no shadow")))?;
    let shadow_lag = lag(&state, &shadow).await;
    state.plugins.promote(&name, params.force, shadow_lag).await?;
    Ok(axum::Json(plugin_json(&state, state.plugins.status(&name)?).await))
}

/// `GET /api/plugins/{name}/query?...`: the query string, as a JSON object, goes to the
/// plugin's `query`; its JSON answer comes back as is.
async fn query_plugin(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(params): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let request = serde_json::to_string(&params).expect("strings serialise");
    let answer = state.plugins.query(&name, request).await?;
    let body: Value = serde_json::from_str(&answer).unwrap_or(Value::String(answer));
    Ok(axum::Json(body).into_response())
}

/// `GET /api/monitoring/iggy-status`: the log's connection, spool depth, partition
/// offsets, and each plugin's lag.
async fn log_status(State(state): State<AppState>) -> axum::Json<Value> {
    let mut status = state.log.status().await;
    let mut plugins = serde_json::Map::new();
    for (plugin, _) in state.plugins.list() {
        let lag = lag(&state, &plugin).await;
        plugins.insert(plugin.name.clone(), json!({"lag": lag, "offsets": plugin.offsets, "state": plugin.state}));
    }
    status["plugins"] = plugins.into();
    axum::Json(status)
}

#[derive(Deserialize)]
struct WsParams {
    rooms: Option<String>,
    /// The last offset the client has (`-1`: send everything retained).
    since: Option<i64>,
    /// The epoch that offset is from (from the welcome frame).
    epoch: Option<u64>,
}

/// `GET /ws?rooms=a,b&since=N[&token=T]`: JSON text frames `{"room", "offset", "event"}`.
/// Every room asked for must be one the token may join (403 otherwise).
async fn websocket(
    State(state): State<AppState>,
    axum::Extension(grant): axum::Extension<Grant>,
    Query(params): Query<WsParams>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let rooms: Vec<String> =
        params.rooms.unwrap_or_default().split(',').map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()).collect();
    if let Some(room) = rooms.iter().find(|r| !grant.may_join(r)) {
        return Err(AuthError::Room(room.clone()).into());
    }
    let resume = match params.since {
        None => Resume::Live,
        Some(offset) if offset < 0 => Resume::All,
        Some(offset) => Resume::After { offset: offset as u64, epoch: params.epoch },
    };
    let hub = state.hub.clone();
    Ok(ws.on_upgrade(move |socket| hub.serve(socket, grant, rooms, resume)))
}
