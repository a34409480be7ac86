//! For operators: `GET /metrics` (Prometheus), `GET /ready` (readiness with its reasons),
//! the publish metrics and summaries (a layer around `POST /api/events`), and the seed's
//! shape of `iggy-status` (`status`, `consumers`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::plugins::lag;
use crate::metrics::{IggyFigures, PluginFigures, Scraped};
use crate::plugins::runner::{PluginStatus, RunState};

/// `GET /metrics`: every metric in the Prometheus text format (scope `metrics`).
#[utoipa::path(get, path = "/metrics", tag = "operate", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let mut plugins = Vec::new();
    for (status, _) in state.plugins.list() {
        let lag = lag(&state, &status).await;
        let (store, name) = (state.store.clone(), status.name.clone());
        let (state_bytes, http_pending) = tokio::task::spawn_blocking(move || {
            (store.state_bytes(&name).unwrap_or(0), store.http_counts(&name).map_or(0, |c| c.pending))
        })
        .await
        .unwrap_or((0, 0));
        plugins.push(PluginFigures {
            state: state_name(status.state),
            processed: status.processed,
            errors: status.errors,
            dead_letters: status.dead_letters,
            swaps: status.swaps,
            lag,
            state_bytes,
            http_pending,
            name: status.name,
        });
    }
    let store = state.store.clone();
    let counts = tokio::task::spawn_blocking(move || (store.fanout_len().unwrap_or(0), store.outbox_counts()))
        .await
        .unwrap_or((0, Ok((0, 0))));
    let log = state.log.status().await;
    let iggy = (log["backend"] == "iggy").then(|| IggyFigures {
        connected: log["connected"] == true,
        spool_depth: log["spool"]["pending"].as_u64().unwrap_or(0),
        spool_set_aside: log["spool"]["setAside"].as_u64().unwrap_or(0),
    });
    let scraped = Scraped {
        plugins,
        clients_connected: state.hub.connected() as u64,
        fanout_records: counts.0,
        outbox_pending: counts.1.map_or(0, |c| c.0),
        iggy,
    };
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], crate::metrics::render(&scraped)).into_response()
}

fn state_name(state: RunState) -> &'static str {
    match state {
        RunState::Starting => "starting",
        RunState::Running => "running",
        RunState::Paused => "paused",
        RunState::Replaying => "replaying",
        RunState::Failed => "failed",
        RunState::Stopped => "stopped",
    }
}

/// `GET /ready`: `200 {"ready": true}`, or `503` with the reasons: the log backend is
/// unreachable, a plugin has failed, or the Iggy spool holds more than
/// `ready_max_spool_depth` events. (`/health` stays the cheap liveness answer.)
#[utoipa::path(get, path = "/ready", tag = "operate", responses((status = 200, description = "ready"), (status = 503, description = "not ready, with the reasons")))]
pub(super) async fn ready(State(state): State<AppState>) -> Response {
    let mut reasons = Vec::new();
    // From what the log already knows: anyone may ask, as often as they like, and that must
    // not turn into requests to Iggy.
    let log = state.log.readiness();
    // Answered without a token (probes send none), so the reasons name what is wrong but
    // carry no error text: a plugin's error can quote the event it failed on. The details
    // are in iggy-status and the plugin's status (admin).
    if !log.connected {
        reasons.push(format!("the log ({}) is unreachable (details: /api/monitoring/iggy-status)", state.backend));
    }
    // A failed shadow is a candidate that did not work out: shown in the plugin's status,
    // but the host serves as before, so it stays ready.
    for (status, _) in state.plugins.list() {
        if status.state == RunState::Failed {
            reasons.push(format!("plugin {} has failed (details: /api/plugins/{})", status.name, status.name));
        }
    }
    let spool = log.spool_depth;
    if spool > state.ready_max_spool_depth {
        reasons.push(format!(
            "{spool} events wait in the spool for Iggy (more than ready_max_spool_depth = {})",
            state.ready_max_spool_depth
        ));
    }
    if reasons.is_empty() {
        axum::Json(json!({"ready": true, "log": state.backend})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"ready": false, "log": state.backend, "reasons": reasons})))
            .into_response()
    }
}

/// The seed documents' fields of `iggy-status`: `status` (`healthy`, `degraded` with a
/// failed plugin or set-aside entries, `unhealthy` while the log is unreachable) and
/// `consumers`, one per plugin and partition, `id` the plugin's Iggy consumer name and
/// `currentOffset` the last offset it handled (-1: none yet). The status code: 503 while
/// unreachable.
pub(super) fn seed_shape(status: &mut Value, plugins: &[PluginStatus]) -> StatusCode {
    let connected = status["connected"] == true;
    let set_aside =
        status["spool"]["setAside"].as_u64().unwrap_or(0) + status["outbox"]["setAside"].as_u64().unwrap_or(0);
    let failed = plugins.iter().any(|p| p.state == RunState::Failed);
    status["status"] = match (connected, failed || set_aside > 0) {
        (false, _) => "unhealthy",
        (true, true) => "degraded",
        (true, false) => "healthy",
    }
    .into();
    let mut consumers = Vec::new();
    for plugin in plugins {
        for (tp, next) in plugin.offsets.iter() {
            consumers.push(json!({
                "id": format!("owlery-{}", plugin.name),
                "plugin": plugin.name,
                "topic": tp.topic,
                "partition": tp.partition,
                "currentOffset": next as i64 - 1,
                "state": state_name(plugin.state),
            }));
        }
    }
    status["consumers"] = consumers.into();
    if connected { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

/// Publish requests since the last summary line.
struct Window {
    since: Instant,
    requests: u64,
    by_status: std::collections::BTreeMap<u16, u64>,
    slowest: Duration,
}

static PUBLISHES: Mutex<Option<Window>> = Mutex::new(None);

/// Around `POST /api/events`: its duration and status into the metrics, and at most one
/// info line a second summing up what was published.
pub(super) async fn count_publish(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    let took = started.elapsed();
    let status = response.status().as_u16();
    crate::metrics::metrics().publish_answered(status, took);
    let mut window = PUBLISHES.lock().unwrap_or_else(|e| e.into_inner());
    let w = window.get_or_insert_with(|| Window {
        since: started,
        requests: 0,
        by_status: Default::default(),
        slowest: Duration::ZERO,
    });
    w.requests += 1;
    *w.by_status.entry(status).or_default() += 1;
    w.slowest = w.slowest.max(took);
    if w.since.elapsed() >= Duration::from_secs(1) {
        let statuses: Vec<String> = w.by_status.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        tracing::info!(
            requests = w.requests,
            statuses = %statuses.join(", "),
            slowest_ms = w.slowest.as_secs_f64() * 1000.0,
            over_ms = w.since.elapsed().as_millis() as u64,
            "publish requests"
        );
        *window = None;
    }
    response
}
