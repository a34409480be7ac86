//! The guest SDK for Owlery plugins.
//!
//! A plugin is a type that implements [`Plugin`], plus one line: `owlery_plugin_sdk::export!(MyPlugin);`
//!
//! ```ignore
//! use owlery_plugin_sdk::{Envelope, HandleError, Plugin};
//!
//! struct Echo;
//! impl Plugin for Echo {
//!     fn init(_config: String) -> Result<(), String> { Ok(()) }
//!     fn handle(batch: Vec<Envelope>) -> Result<(), HandleError> {
//!         for event in &batch {
//!             owlery_plugin_sdk::broadcast(&event.event_id, "all", &event.to_json()).map_err(|e| HandleError::at(0, e))?;
//!         }
//!         Ok(())
//!     }
//!     fn query(_request: String) -> Result<String, String> { Ok("{}".into()) }
//! }
//! owlery_plugin_sdk::export!(Echo);
//! ```

/// The contract this SDK was made for (the package of `wit/owlery.wit`, a copy of the
/// host's). A host that speaks another version refuses the plugin at load, saying both.
pub const CONTRACT: &str = "owlery:plugin@0.2.1";

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "wit",
        default_bindings_module: "owlery_plugin_sdk::bindings",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
    });
}

#[doc(hidden)]
pub use bindings::__export_plugin;

pub use bindings::Guest as Plugin;
pub use bindings::owlery::plugin::types::{Envelope, HandleError, LogLevel};

use bindings::owlery::plugin::host;
use serde::{Serialize, de::DeserializeOwned};

/// Export a type implementing [`Plugin`] as the plugin's entry points.
#[macro_export]
macro_rules! export {
    ($plugin:ident) => {
        $crate::__export_plugin!($plugin with_types_in $crate::bindings);
    };
}

impl HandleError {
    /// The event at `index` of the batch failed with `message`.
    pub fn at(index: usize, message: impl Into<String>) -> Self {
        HandleError { index: Some(index as u32), message: message.into() }
    }
}

impl Envelope {
    /// The payload parsed as JSON (`Null` if it does not parse, which the host prevents).
    pub fn data_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null)
    }

    /// The metadata parsed as JSON.
    pub fn metadata_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.metadata).unwrap_or(serde_json::Value::Null)
    }

    /// The envelope as the JSON object producers sent (camelCase keys).
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "eventId": self.event_id,
            "eventType": self.event_type,
            "timestamp": self.timestamp,
            "source": self.source,
            "userId": self.user_id,
            "metadata": self.metadata_json(),
            "data": self.data_json(),
        })
        .to_string()
    }
}

/// Log a line through the host, tagged with this plugin's name.
pub fn log(level: LogLevel, message: &str) {
    host::log(level, message);
}

/// Wall-clock milliseconds. Never store anything derived from it (see the WIT docs).
pub fn now_ms() -> u64 {
    host::now()
}

/// Send a JSON payload to a WebSocket room, because of the event `cause` (its `event-id`)
/// of the current batch.
pub fn broadcast(cause: &str, room: &str, payload: &str) -> Result<(), String> {
    host::broadcast(cause, room, payload)
}

/// Publish an event caused by the event `cause` (its `event-id`) of the current batch.
pub fn publish(cause: &str, event_type: &str, data: &serde_json::Value) -> Result<(), String> {
    host::publish(cause, event_type, &data.to_string())
}

pub use bindings::owlery::plugin::host::HttpRequest;

/// Ask the host to send an HTTP request because of the event `cause` (its `event-id`) of the
/// current batch. It is committed with the batch and sent afterwards, at least once, with an
/// `Idempotency-Key` header (the same on every repeat); the URL must be allowed by the
/// manifest's `[capabilities] http`. The plugin never sees the answer: a request that fails
/// for good becomes an `owlery.delivery_failed` dead letter.
pub fn send_http(cause: &str, request: &HttpRequest) -> Result<(), String> {
    host::send_http(cause, request)
}

/// `send_http` of a JSON body (`POST`, `content-type: application/json`).
pub fn post_json(cause: &str, url: &str, body: &serde_json::Value) -> Result<(), String> {
    let request = HttpRequest {
        method: "POST".into(),
        url: url.into(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
    };
    send_http(cause, &request)
}

/// The plugin's key space; every write is committed with the batch, or not at all.
pub mod state {
    use super::*;

    pub fn get(key: &str) -> Option<Vec<u8>> {
        host::state_get(key)
    }
    pub fn set(key: &str, value: &[u8]) {
        host::state_set(key, value)
    }
    pub fn delete(key: &str) {
        host::state_delete(key)
    }
    pub fn scan(prefix: &str) -> Vec<(String, Vec<u8>)> {
        host::state_scan(prefix)
    }
    /// Read a JSON value; `None` when missing or unreadable.
    pub fn get_json<T: DeserializeOwned>(key: &str) -> Option<T> {
        get(key).and_then(|bytes| serde_json::from_slice(&bytes).ok())
    }
    pub fn set_json<T: Serialize>(key: &str, value: &T) {
        set(key, &serde_json::to_vec(value).expect("state value serialises"))
    }
}
