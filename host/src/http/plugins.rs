//! Plugin admin and queries: `/api/plugins/...`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::guard::{PluginName, WasmBody, content_type};
use super::{ApiError, AppState};
use crate::plugins::runner::{PluginStatus, ReplayFrom};
use crate::plugins::{Installed, PluginError, Plugins};

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

pub(super) async fn lag(state: &AppState, status: &PluginStatus) -> u64 {
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
    // What became of its HTTP requests (kept in the store: they outlive a restart).
    let http = state.store.http_counts(&status.name).unwrap_or_default();
    value["http"] = serde_json::to_value(http).expect("counts serialise");
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

#[utoipa::path(get, path = "/api/plugins", tag = "plugins", responses((status = 200, description = "every plugin's status")))]
pub(super) async fn list_plugins(State(state): State<AppState>) -> axum::Json<Value> {
    let mut out = Vec::new();
    for status in state.plugins.list() {
        out.push(plugin_json(&state, status).await);
    }
    axum::Json(json!({ "plugins": out }))
}

#[utoipa::path(get, path = "/api/plugins/{name}", tag = "plugins", params(("name" = String, Path, description = "the plugin's name")), responses((status = 200, description = "its status"), (status = 404, description = "no such plugin")))]
pub(super) async fn plugin_status(
    State(state): State<AppState>,
    PluginName(name): PluginName,
) -> Result<axum::Json<Value>, ApiError> {
    let status = state.plugins.status(&name)?;
    Ok(axum::Json(plugin_json(&state, status).await))
}

#[derive(Deserialize)]
pub(super) struct UploadParams {
    /// The manifest (TOML text); without it a plugin keeps the one it has.
    manifest: Option<String>,
}

/// `PUT /api/plugins/{name}?manifest=TOML` with the `.wasm` as the body: validated and
/// compiled before anything is replaced; then started, or swapped in keeping its offsets
/// and state, and saved in the plugins directory.
#[utoipa::path(put, path = "/api/plugins/{name}", tag = "plugins", params(("name" = String, Path), ("manifest" = Option<String>, Query, description = "the manifest, TOML")), request_body(content = Vec<u8>, content_type = "application/wasm"), responses((status = 201, description = "installed"), (status = 200, description = "swapped in"), (status = 400, description = "not a plugin that starts"), (status = 413, description = "over max_upload_mb")))]
pub(super) async fn upload_plugin(
    State(state): State<AppState>,
    PluginName(name): PluginName,
    Query(params): Query<UploadParams>,
    WasmBody(body): WasmBody,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
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
pub(super) struct Switches {
    #[serde(default)]
    purge: bool,
    #[serde(default)]
    force: bool,
}

/// `DELETE /api/plugins/{name}[?purge=true]`: stop it and delete its files; its offsets
/// and state stay (so adding it again resumes) unless `purge`.
#[utoipa::path(delete, path = "/api/plugins/{name}", tag = "plugins", params(("name" = String, Path), ("purge" = Option<bool>, Query)), responses((status = 200, description = "removed"), (status = 404, description = "no such plugin")))]
pub(super) async fn delete_plugin(
    State(state): State<AppState>,
    PluginName(name): PluginName,
    Query(params): Query<Switches>,
) -> Result<axum::Json<Value>, ApiError> {
    change(&state, &name, move |p, name| p.delete(name, params.purge)).await?;
    Ok(axum::Json(json!({"removed": name, "purged": params.purge})))
}

#[utoipa::path(post, path = "/api/plugins/{name}/pause", tag = "plugins", params(("name" = String, Path, description = "the plugin's name")), responses((status = 200, description = "paused"), (status = 404, description = "no such plugin")))]
pub(super) async fn pause_plugin(State(state): State<AppState>, PluginName(name): PluginName) -> PluginAnswer {
    then_status(&state, &name, state.plugins.pause(&name)).await
}

#[utoipa::path(post, path = "/api/plugins/{name}/resume", tag = "plugins", params(("name" = String, Path, description = "the plugin's name")), responses((status = 200, description = "running"), (status = 404, description = "no such plugin")))]
pub(super) async fn resume_plugin(State(state): State<AppState>, PluginName(name): PluginName) -> PluginAnswer {
    then_status(&state, &name, state.plugins.resume(&name)).await
}

type PluginAnswer = Result<axum::Json<Value>, ApiError>;

/// Run `operation` on plugin `name`, then answer with its status.
async fn then_status(
    state: &AppState,
    name: &str,
    operation: impl Future<Output = Result<(), PluginError>>,
) -> PluginAnswer {
    operation.await?;
    Ok(axum::Json(plugin_json(state, state.plugins.status(name)?).await))
}

/// `POST /api/plugins/{name}/replay` with `{"from": 0}`, `{"offsets": {"topic": {"0": 5}}}`
/// or `{"timestamp": "2026-11-23T10:00:00Z"}` (an empty body means from 0).
#[utoipa::path(post, path = "/api/plugins/{name}/replay", tag = "plugins", params(("name" = String, Path, description = "the plugin's name")), request_body(content = Option<serde_json::Value>, content_type = "application/json", description = "{from: 0} or {timestamp: RFC 3339}; none: from 0"), responses((status = 202, description = "replaying"), (status = 404, description = "no such plugin")))]
pub(super) async fn replay_plugin(
    State(state): State<AppState>,
    PluginName(name): PluginName,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let request: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({"from": 0})
    } else {
        content_type(&headers, "application/json")?;
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
#[utoipa::path(post, path = "/api/plugins/{name}/shadow", tag = "plugins", params(("name" = String, Path), ("manifest" = Option<String>, Query)), request_body(content = Vec<u8>, content_type = "application/wasm"), responses((status = 201, description = "the shadow runs"), (status = 400, description = "not a plugin that starts")))]
pub(super) async fn start_shadow(
    State(state): State<AppState>,
    PluginName(name): PluginName,
    Query(params): Query<UploadParams>,
    WasmBody(body): WasmBody,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    change(&state, &name, move |p, name| p.start_shadow(name, &body, params.manifest.as_deref())).await?;
    Ok((StatusCode::CREATED, axum::Json(plugin_json(&state, state.plugins.status(&name)?).await)))
}

#[utoipa::path(delete, path = "/api/plugins/{name}/shadow", tag = "plugins", params(("name" = String, Path, description = "the plugin's name")), responses((status = 200, description = "discarded"), (status = 409, description = "no shadow")))]
pub(super) async fn discard_shadow(
    State(state): State<AppState>,
    PluginName(name): PluginName,
) -> Result<axum::Json<Value>, ApiError> {
    change(&state, &name, |p, name| p.discard_shadow(name)).await?;
    Ok(axum::Json(plugin_json(&state, state.plugins.status(&name)?).await))
}

/// `POST /api/plugins/{name}/promote[?force=true]`: the shadow becomes the live version
/// with its state and offsets; 409 while it still lags (unless forced).
#[utoipa::path(post, path = "/api/plugins/{name}/promote", tag = "plugins", params(("name" = String, Path), ("force" = Option<bool>, Query)), responses((status = 200, description = "promoted"), (status = 409, description = "the shadow still lags")))]
pub(super) async fn promote_shadow(
    State(state): State<AppState>,
    PluginName(name): PluginName,
    Query(params): Query<Switches>,
) -> Result<axum::Json<Value>, ApiError> {
    let (_, shadow) = state.plugins.status(&name)?;
    let shadow = shadow.ok_or_else(|| PluginError::NoShadow(name.clone()))?;
    let shadow_lag = lag(&state, &shadow).await;
    state.plugins.promote(&name, params.force, shadow_lag).await?;
    Ok(axum::Json(plugin_json(&state, state.plugins.status(&name)?).await))
}

/// `GET /api/plugins/{name}/query?...`: the query string, as a JSON object, goes to the
/// plugin's `query`; its JSON answer comes back as is.
#[utoipa::path(get, path = "/api/plugins/{name}/query", tag = "plugins", params(("name" = String, Path, description = "the plugin's name")), responses((status = 200, description = "the plugin's JSON answer"), (status = 504, description = "it did not answer in query_timeout_ms")))]
pub(super) async fn query_plugin(
    State(state): State<AppState>,
    PluginName(name): PluginName,
    Query(params): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let request = serde_json::to_string(&params).expect("strings serialise");
    let answer = state.plugins.query(&name, request).await?;
    let body: Value = serde_json::from_str(&answer).unwrap_or(Value::String(answer));
    Ok(axum::Json(body).into_response())
}
