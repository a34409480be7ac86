//! Dead letters: an event the plugin could not handle (or a record that is not an event)
//! goes to the dead-letter topic with the error, and the plugin moves on. Too many in a
//! row and the plugin is stopped as failed.

use super::poll::Polled;
use crate::keys::HostKey;
use crate::log::AppendItem;

pub use crate::topics::{DEAD_LETTER_TYPE, DEAD_LETTERS as DEAD_LETTER_TOPIC};

/// Consecutive dead letters after which a plugin is marked failed and stops.
pub const FAIL_AFTER_DEAD_LETTERS: u32 = 100;

/// The dead letter of plugin `plugin` for `polled`. Its event id is derived from where the
/// record stands (keyed, like plugin output ids), so the same failure written again (a batch
/// retried after a crash) is accepted once.
pub fn dead_letter(key: &HostKey, plugin: &str, polled: &Polled, error: &str) -> AppendItem {
    let record = &polled.record;
    let original = serde_json::from_slice::<serde_json::Value>(&record.payload)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&record.payload).into_owned()));
    let at = format!("owlery/dead-letter/{plugin}/{}", polled.at());
    let event_id = key.id(&at);
    let data = serde_json::json!({
        "plugin": plugin,
        "error": error,
        "topic": polled.topic,
        "partition": record.partition,
        "offset": record.offset,
        "event": original,
    });
    crate::topics::dead_letter(event_id, DEAD_LETTER_TYPE, plugin, data)
}
