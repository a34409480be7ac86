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
#[utoipa::path(post, path = "/api/events", tag = "events", params(("topic" = Option<String>, Query, description = "a topic other than the routing table's choice")), request_body(content = serde_json::Value, content_type = "application/json", description = "one envelope or an array of them"), responses((status = 201, description = "durable: where each landed"), (status = 400, description = "an invalid envelope, named"), (status = 415, description = "not application/json"), (status = 503, description = "storage failure")))]
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
        let route = state.routing.route(&envelope.event_type);
        let topic = params.topic.clone().unwrap_or_else(|| route.topic().to_owned());
        items.push(AppendItem { topic, key: route.key_of(&envelope), envelope });
    }
    let appended = state.log.append(items).await?;
    Ok((StatusCode::CREATED, axum::Json(json!({ "events": appended }))))
}

/// `owlery.*` event types (dead letters, broadcasts) and the source `owlery` (presence) are
/// the host's own: a producer that could send them could forge what plugins and clients
/// trust.
fn refuse_reserved_type(envelope: Envelope) -> Result<Envelope, EnvelopeError> {
    if envelope.event_type.starts_with("owlery.") {
        return Err(EnvelopeError {
            field: "eventType",
            message: format!("{:?}: owlery.* event types are reserved for the host", envelope.event_type),
        });
    }
    if envelope.source == crate::presence::SOURCE {
        return Err(EnvelopeError {
            field: "source",
            message: format!("{:?} is reserved for the host's own events (presence)", envelope.source),
        });
    }
    Ok(envelope)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ReplayParams {
    topic: Option<String>,
    partition: Option<u32>,
    /// The first offset wanted: `12` for every partition, or `0:12,1:7` per partition.
    from_offset: Option<String>,
    /// The last offset the client has (the seeds' catch-up form): what follows it is sent.
    /// `5` or `0:5,1:9`; `-1` for nothing yet.
    last_offset: Option<String>,
    limit: Option<usize>,
}

/// Where each partition starts: one offset for every partition, or one per partition
/// (partitions not named start at zero).
#[derive(Debug, PartialEq, Eq)]
enum Starts {
    All(u64),
    Each(BTreeMap<u32, u64>),
}

impl Starts {
    fn of(&self, partition: u32) -> u64 {
        match self {
            Starts::All(offset) => *offset,
            Starts::Each(map) => map.get(&partition).copied().unwrap_or(0),
        }
    }

    /// `fromOffset` / `lastOffset` as given; a last offset is turned into the one after it.
    fn parse(params: &ReplayParams) -> Result<Starts, ApiError> {
        let (field, text, after) = match (&params.from_offset, &params.last_offset) {
            (Some(_), Some(_)) => {
                return Err(
                    ApiError::bad_request("give fromOffset or lastOffset, not both").with("field", "lastOffset")
                );
            }
            (Some(text), None) => ("fromOffset", text, false),
            (None, Some(text)) => ("lastOffset", text, true),
            (None, None) => return Ok(Starts::All(0)),
        };
        let offset = |text: &str| -> Result<u64, ApiError> {
            let bad = || {
                let wanted = if after { "an offset (-1: none yet)" } else { "an offset" };
                ApiError::bad_request(format!("{field}: {text:?} is not {wanted}; per partition: 0:12,1:7"))
                    .with("field", field)
            };
            match text.trim() {
                "-1" if after => Ok(0),
                n => n.parse::<u64>().map(|n| if after { n.saturating_add(1) } else { n }).map_err(|_| bad()),
            }
        };
        if !text.contains(':') {
            return Ok(Starts::All(offset(text)?));
        }
        let mut each = BTreeMap::new();
        for part in text.split(',').filter(|p| !p.trim().is_empty()) {
            let (partition, at) = part.split_once(':').unwrap_or((part, ""));
            let partition: u32 = partition.trim().parse().map_err(|_| {
                ApiError::bad_request(format!("{field}: {partition:?} is not a partition number")).with("field", field)
            })?;
            each.insert(partition, offset(at)?);
        }
        Ok(Starts::Each(each))
    }
}

/// `GET /api/events/replay?topic=&fromOffset=|lastOffset=&limit=[&partition=]`: stored
/// envelopes in offset order, per partition; `next` says where to continue (and can be
/// sent back as `fromOffset=0:12,1:7`).
#[utoipa::path(get, path = "/api/events/replay", tag = "events", params(("topic" = String, Query), ("fromOffset" = Option<String>, Query), ("lastOffset" = Option<String>, Query), ("limit" = Option<u64>, Query), ("partition" = Option<u32>, Query)), responses((status = 200, description = "records and the next offsets"), (status = 400, description = "a bad parameter, named")))]
pub(super) async fn replay(
    State(state): State<AppState>,
    Query(params): Query<ReplayParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let starts = Starts::parse(&params)?;
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
        let from = starts.of(partition);
        let want = limit - records.len();
        let polled = if want == 0 { Vec::new() } else { state.log.poll(&topic, partition, from, want).await? };
        next.insert(partition.to_string(), polled.last().map_or(from, |r| r.offset + 1));
        for record in polled {
            let event: Value = serde_json::from_slice(&record.payload)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&record.payload).into_owned()));
            records.push(json!({"partition": record.partition, "offset": record.offset, "event": event}));
        }
    }
    Ok(axum::Json(json!({"topic": topic, "records": records, "next": next})))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{ReplayParams, Starts};

    fn starts(from: Option<&str>, last: Option<&str>) -> Result<Starts, String> {
        let params = ReplayParams {
            topic: None,
            partition: None,
            from_offset: from.map(str::to_owned),
            last_offset: last.map(str::to_owned),
            limit: None,
        };
        Starts::parse(&params).map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn last_offset_is_the_one_before_where_replay_starts_in_every_form() {
        assert_eq!(starts(None, None), Ok(Starts::All(0)));
        assert_eq!(starts(Some("5"), None), Ok(Starts::All(5)));
        assert_eq!(starts(None, Some("5")), Ok(Starts::All(6)));
        assert_eq!(starts(None, Some("-1")), Ok(Starts::All(0)));
        assert_eq!(starts(None, Some(&u64::MAX.to_string())), Ok(Starts::All(u64::MAX)), "saturates");
        let each = starts(None, Some("0:5, 2:9")).unwrap();
        assert_eq!(each, Starts::Each(BTreeMap::from([(0, 6), (2, 10)])));
        assert_eq!((each.of(0), each.of(1), each.of(2)), (6, 0, 10));
        assert_eq!(starts(Some("1:7"), None), Ok(Starts::Each(BTreeMap::from([(1, 7)]))));
        for (from, last) in
            [(Some("x"), None), (None, Some("-2")), (None, Some("0:")), (Some("a:1"), None), (Some("1"), Some("1"))]
        {
            assert!(starts(from, last).is_err(), "{from:?} {last:?}");
        }
    }
}
