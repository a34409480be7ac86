//! Presence: the host speaks through the log. With `[presence] enabled = true`, each
//! `/ws` and Socket.IO client's connect, room changes and disconnect are published as
//! ordinary events (`user.connected`, `user.joined_room`, `user.left_room`,
//! `user.disconnected`), so plugins and replays see them like any producer's.
//!
//! The user is the token's subject (a JWT's `sub`, a static token's `name`), else an
//! anonymous id made from the connection's. Each change is published once: joining a room
//! the client is already in says nothing. One task appends them in the order they happened,
//! so one connection's events keep their order in the log (they share the user's key).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::auth::{Grant, ROOM_ALL};
use crate::envelope::{Envelope, now_rfc3339};
use crate::log::{AppendItem, EventLog};
use crate::routing::Routing;

/// The `[presence]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// Publish presence events for fan-out clients (off by default).
    pub enabled: bool,
}

/// Presence events waiting to be appended; past this many (the log refusing them for a
/// long while) new ones are dropped and logged rather than held in memory.
const QUEUE: usize = 65_536;
/// Attempts at appending one round before it is dropped (logged).
const ATTEMPTS: u32 = 5;

/// Where connections report; a no-op when presence is off.
#[derive(Clone, Default)]
pub struct Presence {
    queue: Option<mpsc::Sender<Envelope>>,
}

impl Presence {
    /// Presence off: connections report nothing.
    pub fn disabled() -> Presence {
        Presence::default()
    }

    /// Presence on: the task that appends what connections report, in order, to `log`
    /// (run it for the life of the host).
    pub fn start(log: Arc<dyn EventLog>, routing: Arc<Routing>) -> (Presence, impl Future<Output = ()> + Send) {
        let (queue, events) = mpsc::channel(QUEUE);
        (Presence { queue: Some(queue) }, append_all(events, log, routing))
    }

    /// A client connected in `rooms` (`all` aside) over `transport`; it reports until it
    /// is dropped, which says it disconnected.
    pub fn connect<'r>(
        &self,
        grant: &Grant,
        transport: &'static str,
        rooms: impl IntoIterator<Item = &'r String>,
    ) -> Connection {
        let id = Uuid::new_v4();
        let user = grant.user.clone().unwrap_or_else(|| format!("anonymous:{id}"));
        let connection = Connection {
            presence: self.clone(),
            user,
            id,
            transport,
            rooms: Mutex::new(BTreeSet::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
        };
        if self.queue.is_some() {
            connection.emit("user.connected", json!({}));
            connection.rooms_now(rooms);
        }
        connection
    }
}

/// One connected client, as presence sees it.
pub struct Connection {
    presence: Presence,
    user: String,
    id: Uuid,
    transport: &'static str,
    /// The rooms it is in (`all` aside), as last reported.
    rooms: Mutex<BTreeSet<String>>,
    closed: std::sync::atomic::AtomicBool,
}

impl Connection {
    /// The client's rooms are now `rooms`: a `user.joined_room` for each new one, a
    /// `user.left_room` for each it is no longer in.
    pub fn rooms_now<'r>(&self, rooms: impl IntoIterator<Item = &'r String>) {
        if self.presence.queue.is_none() {
            return;
        }
        let now: BTreeSet<String> = rooms.into_iter().filter(|r| r.as_str() != ROOM_ALL).cloned().collect();
        let before = std::mem::replace(&mut *self.rooms.lock().unwrap_or_else(|e| e.into_inner()), now.clone());
        for room in now.difference(&before) {
            self.emit("user.joined_room", json!({ "room": room }));
        }
        for room in before.difference(&now) {
            self.emit("user.left_room", json!({ "room": room }));
        }
    }

    /// It disconnected (also said when it is dropped; said once).
    pub fn close(&self) {
        if self.presence.queue.is_none() || self.closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let rooms: Vec<String> = self.rooms.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
        self.emit("user.disconnected", json!({ "rooms": rooms }));
    }

    fn emit(&self, event_type: &str, mut data: serde_json::Value) {
        let Some(queue) = &self.presence.queue else { return };
        data["userId"] = self.user.clone().into();
        data["connectionId"] = self.id.to_string().into();
        data["transport"] = self.transport.into();
        let envelope = Envelope {
            event_id: Uuid::new_v4(),
            event_type: event_type.to_owned(),
            timestamp: now_rfc3339(),
            source: "owlery".to_owned(),
            user_id: Some(self.user.clone()),
            metadata: serde_json::Map::new(),
            data,
            extra: serde_json::Map::new(),
        };
        if queue.try_send(envelope).is_err() {
            tracing::warn!(event_type, user = %self.user, "presence queue full (the log is not taking events); dropped");
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close();
    }
}

/// Append what connections report, in order, a round (whatever has queued) at a time.
async fn append_all(mut events: mpsc::Receiver<Envelope>, log: Arc<dyn EventLog>, routing: Arc<Routing>) {
    let mut round = Vec::new();
    while events.recv_many(&mut round, 512).await > 0 {
        let items: Vec<AppendItem> = round
            .drain(..)
            .map(|envelope| {
                let route = routing.route(&envelope.event_type);
                AppendItem { topic: route.topic().to_owned(), key: route.key_of(&envelope), envelope }
            })
            .collect();
        for attempt in 1..=ATTEMPTS {
            match log.append(items.clone()).await {
                Ok(_) => break,
                Err(error) if attempt == ATTEMPTS => {
                    tracing::error!(%error, events = items.len(), "presence events could not be appended; dropped");
                }
                Err(error) => {
                    tracing::warn!(%error, attempt, "appending presence events failed; trying again");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
            }
        }
    }
}
