//! ws-broadcast: routes incident, comment, severity and presence events to WebSocket rooms.
//!
//! - `incident.created` → room `all` (every connected client)
//! - `incident.updated`, `incident.resolved`, `comment.added`, `severity.escalated` →
//!   room `incident:{id}`, the id taken from `data.id`, else `data.incidentId`
//! - `user.connected|disconnected|joined_room|left_room` → room `presence`

use owlery_plugin_sdk::{Envelope, HandleError, LogLevel, Plugin};

struct WsBroadcast;

fn room_for(event: &Envelope) -> Option<String> {
    match event.event_type.as_str() {
        "incident.created" => Some("all".to_owned()),
        "incident.updated" | "incident.resolved" | "comment.added" | "severity.escalated" => {
            let data = event.data_json();
            let id = data.get("id").or_else(|| data.get("incidentId"))?;
            match id {
                serde_json::Value::String(s) if !s.is_empty() => Some(format!("incident:{s}")),
                serde_json::Value::Number(n) => Some(format!("incident:{n}")),
                _ => None,
            }
        }
        "user.connected" | "user.disconnected" | "user.joined_room" | "user.left_room" => Some("presence".to_owned()),
        _ => None,
    }
}

impl Plugin for WsBroadcast {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn handle(batch: Vec<owlery_plugin_sdk::Envelope>) -> Result<(), HandleError> {
        for (index, event) in batch.iter().enumerate() {
            match room_for(event) {
                Some(room) => owlery_plugin_sdk::broadcast(&event.event_id, &room, &event.to_json())
                    .map_err(|e| HandleError::at(index, e))?,
                None if event.event_type != "incident.created" && event.event_type.starts_with("incident.") => {
                    owlery_plugin_sdk::log(
                        LogLevel::Warn,
                        &format!("{} {} has no data.id or data.incidentId", event.event_type, event.event_id),
                    );
                }
                None => {}
            }
        }
        Ok(())
    }

    fn query(_request: String) -> Result<String, String> {
        Ok(r#"{"rooms":["all","incident:{id}","presence"]}"#.to_owned())
    }
}

owlery_plugin_sdk::export!(WsBroadcast);
