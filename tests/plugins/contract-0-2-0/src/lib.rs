//! A plugin built against the contract as it was before `send-http` (`owlery:plugin@0.2.0`,
//! `wit/` here is that version's file, kept as it was): a host that speaks 0.2.1 must run it
//! unchanged. It counts the events it handles (`state` key `n`), answers `{"n": N}` to a
//! query, and broadcasts each event's id to room `old`.

wit_bindgen::generate!({ world: "plugin", path: "wit" });

use owlery::plugin::host;

struct Old;

fn count() -> u64 {
    host::state_get("n").and_then(|v| String::from_utf8(v).ok()).and_then(|s| s.parse().ok()).unwrap_or(0)
}

impl Guest for Old {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn handle(batch: Vec<Envelope>) -> Result<(), HandleError> {
        for (index, event) in batch.iter().enumerate() {
            let payload = format!("{{\"id\":{:?}}}", event.event_id);
            host::broadcast(&event.event_id, "old", &payload)
                .map_err(|message| HandleError { index: Some(index as u32), message })?;
        }
        host::state_set("n", (count() + batch.len() as u64).to_string().as_bytes());
        Ok(())
    }

    fn query(_request: String) -> Result<String, String> {
        Ok(format!("{{\"n\":{}}}", count()))
    }
}

export!(Old);
