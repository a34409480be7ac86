//! `POST /api/events` and `GET /api/events/replay`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::guard::content_type;
use super::{ApiError, AppState, MAX_EVENTS_PER_REQUEST};
use crate::envelope::{Envelope, EnvelopeError, check_json_shape, check_topic};
use crate::log::AppendItem;

/// Records returned by one replay request at most.
const MAX_REPLAY: usize = 10_000;

#[derive(Deserialize)]
pub(super) struct PublishParams {
    topic: Option<String>,
}

/// `POST /api/events`: one envelope or an array. All are validated before any is appended.
pub(super) async fn publish(
    State(state): State<AppState>,
    Query(params): Query<PublishParams>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let body = body.map_err(|r| super::error::unreadable_body(r, "(body)"))?;
    content_type(&headers, "application/json")?;
    check_json_shape(&body).map_err(|e| ApiError::bad_request(e.to_string()).with("field", e.field))?;
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
        if !state.producer_topics.contains(topic) {
            return Err(ApiError::bad_request(format!(
                "topic: {topic:?} is not one producers may write (the routing table's, or extra_topics in owlery.toml)"
            ))
            .with("field", "topic"));
        }
    }
    let mut items = Vec::with_capacity(values.len());
    for (index, value) in values.into_iter().enumerate() {
        let envelope = Envelope::from_producer(value).and_then(refuse_reserved_type).map_err(|e| {
            let error = ApiError::bad_request(e.to_string()).with("field", e.field);
            if single { error } else { error.with("index", index) }
        })?;
        let topic = params.topic.clone().unwrap_or_else(|| state.routing.topic_for(&envelope.event_type).to_owned());
        items.push(AppendItem { topic, key: envelope.partition_key(), envelope });
    }
    let appended = state.log.append(items).await?;
    Ok((StatusCode::CREATED, axum::Json(json!({ "events": appended }))))
}

/// `owlery.*` event types (dead letters, broadcasts) are the host's own: a producer that
/// could send them could forge what plugins and clients trust.
fn refuse_reserved_type(envelope: Envelope) -> Result<Envelope, EnvelopeError> {
    if envelope.event_type.starts_with("owlery.") {
        return Err(EnvelopeError {
            field: "eventType",
            message: format!("{:?}: owlery.* event types are reserved for the host", envelope.event_type),
        });
    }
    Ok(envelope)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ReplayParams {
    topic: Option<String>,
    partition: Option<u32>,
    #[serde(default)]
    from_offset: u64,
    limit: Option<usize>,
}

/// `GET /api/events/replay?topic=&fromOffset=&limit=[&partition=]`: stored envelopes in
/// offset order, per partition; `next` says where to continue.
pub(super) async fn replay(
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
