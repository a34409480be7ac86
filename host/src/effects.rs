//! What one plugin batch changes, as plain data: made by the runtime's host imports,
//! committed by the runner through the store. Neither of those has to name the other.

use std::collections::BTreeMap;

use crate::log::AppendItem;

/// A broadcast made by a plugin: `id` is derived from the plugin, its cause and a counter,
/// so the same broadcast made again (a redelivered batch, another host) has the same id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broadcast {
    pub id: uuid::Uuid,
    pub room: String,
    /// JSON text
    pub payload: String,
    /// What kind of broadcast it is: its payload's `eventType` when it has one, else the
    /// type of the event that caused it. Socket.IO names the broadcast after it.
    pub event: String,
}

/// An HTTP request a plugin asked for (checked against its manifest): `id` is derived like a
/// broadcast's, and is the `Idempotency-Key` the receiver sees on every attempt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HttpRequest {
    pub id: uuid::Uuid,
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
    /// The event that caused it (its `eventId`).
    pub cause: String,
    /// How it is delivered, from the manifest when it was made.
    pub policy: crate::delivery::Policy,
}

/// Bytes as base64 text in JSON (a request body need not be UTF-8).
mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    pub fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: std::borrow::Cow<'de, str> = serde::Deserialize::deserialize(d)?;
        STANDARD.decode(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}

/// The buffered effects of one call; applied by the runner only if the call succeeded.
#[derive(Debug, Default)]
pub struct Effects {
    /// key → new value, or `None` to delete
    pub state_writes: BTreeMap<String, Option<Vec<u8>>>,
    pub broadcasts: Vec<Broadcast>,
    pub publishes: Vec<AppendItem>,
    pub http: Vec<HttpRequest>,
}
