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

/// The buffered effects of one call; applied by the runner only if the call succeeded.
#[derive(Debug, Default)]
pub struct Effects {
    /// key → new value, or `None` to delete
    pub state_writes: BTreeMap<String, Option<Vec<u8>>>,
    pub broadcasts: Vec<Broadcast>,
    pub publishes: Vec<AppendItem>,
}
