//! ws-broadcast: routes the incident map's events to WebSocket and Socket.IO rooms.
//!
//! - `incident.created`, `incident.resolved`, `incident.deleted` → room `all` (everyone's
//!   map shows or drops the incident)
//! - `incident.updated`, `comment.added`, `comment.created`, `severity.escalated` → room
//!   `incident:{id}`, the id taken from `data.id`, else `data.incidentId` (a comment's own
//!   `data.id` is not its incident's: comments look at `data.incidentId` first)
//! - `user.connected|disconnected|joined_room|left_room`, `presence.connected|disconnected`
//!   → room `presence`
//!
//! `[config] payload` says what each broadcast carries: `"envelope"` (the default) the whole
//! event; `"incident-map"` the shapes the incident map's browser code reads:
//! `{incident, createdBy: {userId}}`, `{incident, updatedBy}`, `{incidentId, resolvedBy,
//! resolution}`, `{incidentId, deletedBy}`, `{comment, incidentId, createdBy}`,
//! `{incidentId, severity, escalatedBy}`, and a presence event's `data` with its `userId`.

use std::cell::Cell;

use owlery_plugin_sdk::{Envelope, HandleError, LogLevel, Plugin};
use serde::Deserialize;
use serde_json::{Value, json};

/// What a broadcast carries.
#[derive(Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum Payload {
    #[default]
    Envelope,
    IncidentMap,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    payload: Payload,
}

thread_local! {
    static PAYLOAD: Cell<Payload> = const { Cell::new(Payload::Envelope) };
}

/// Where an event goes: a room, or why not.
enum Room {
    To(String),
    NoIncidentId,
    NotBroadcast,
}

/// The incident an event is about, as it was sent (`42` stays a number, `"42"` a string):
/// `data.id`, else `data.incidentId` (for a comment the other way round), whichever is a
/// non-empty string or a number, as the host's routing takes it for the partition key.
fn incident_id(data: &Value, comment: bool) -> Option<&Value> {
    let fields = if comment { ["incidentId", "id"] } else { ["id", "incidentId"] };
    fields.into_iter().filter_map(|f| data.get(f)).find(|v| match v {
        Value::String(s) => !s.is_empty(),
        Value::Number(_) => true,
        _ => false,
    })
}

/// The room of an incident: `incident:42` for `42` and `"42"` alike.
fn incident_room(id: &Value) -> String {
    match id {
        Value::String(s) => format!("incident:{s}"),
        other => format!("incident:{other}"),
    }
}

fn room_for(event_type: &str, data: &Value) -> Room {
    match event_type {
        "incident.created" | "incident.resolved" | "incident.deleted" => Room::To("all".to_owned()),
        "incident.updated" | "comment.added" | "comment.created" | "severity.escalated" => {
            match incident_id(data, event_type.starts_with("comment.")) {
                Some(id) => Room::To(incident_room(id)),
                None => Room::NoIncidentId,
            }
        }
        "user.connected"
        | "user.disconnected"
        | "user.joined_room"
        | "user.left_room"
        | "presence.connected"
        | "presence.disconnected" => Room::To("presence".to_owned()),
        _ => Room::NotBroadcast,
    }
}

/// The incident map's shape of an event.
fn incident_map(event: &Envelope, data: Value) -> Value {
    let by = json!({ "userId": event.user_id });
    let comment = event.event_type.starts_with("comment.");
    let id = incident_id(&data, comment).cloned().unwrap_or(Value::Null);
    match event.event_type.as_str() {
        "incident.created" => json!({ "incident": data, "createdBy": by }),
        "incident.updated" => json!({ "incident": data, "updatedBy": by }),
        "incident.resolved" => json!({ "incidentId": id, "resolvedBy": by, "resolution": data.get("resolution") }),
        "incident.deleted" => json!({ "incidentId": id, "deletedBy": by }),
        "severity.escalated" => json!({ "incidentId": id, "severity": data.get("severity"), "escalatedBy": by }),
        _ if comment => json!({ "comment": data, "incidentId": id, "createdBy": by }),
        // Presence: what it said, and who.
        _ => {
            let mut data = if data.is_object() { data } else { json!({}) };
            if data.get("userId").is_none_or(Value::is_null) {
                data["userId"] = event.user_id.clone().map_or(Value::Null, Value::String);
            }
            data
        }
    }
}

struct WsBroadcast;

impl Plugin for WsBroadcast {
    fn init(config: String) -> Result<(), String> {
        let config: Config = match config.trim() {
            "" | "null" => Config::default(),
            text => serde_json::from_str(text)
                .map_err(|e| format!("ws-broadcast config: {e} (payload is \"envelope\" or \"incident-map\")"))?,
        };
        PAYLOAD.set(config.payload);
        Ok(())
    }

    fn handle(batch: Vec<Envelope>) -> Result<(), HandleError> {
        let shape = PAYLOAD.get();
        for (index, event) in batch.iter().enumerate() {
            let data = event.data_json();
            match room_for(&event.event_type, &data) {
                Room::To(room) => {
                    let payload = match shape {
                        Payload::Envelope => event.to_json(),
                        Payload::IncidentMap => incident_map(event, data).to_string(),
                    };
                    owlery_plugin_sdk::broadcast(&event.event_id, &room, &payload)
                        .map_err(|e| HandleError::at(index, e))?
                }
                Room::NoIncidentId => owlery_plugin_sdk::log(
                    LogLevel::Warn,
                    &format!("{} {} has no data.id or data.incidentId", event.event_type, event.event_id),
                ),
                Room::NotBroadcast => {}
            }
        }
        Ok(())
    }

    fn query(_request: String) -> Result<String, String> {
        let payload = match PAYLOAD.get() {
            Payload::Envelope => "envelope",
            Payload::IncidentMap => "incident-map",
        };
        Ok(json!({"rooms": ["all", "incident:{id}", "presence"], "payload": payload}).to_string())
    }
}

owlery_plugin_sdk::export!(WsBroadcast);
