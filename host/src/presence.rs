//! Presence: the host speaks through the log. With `[presence] enabled = true`, each
//! `/ws` and Socket.IO client's connect, room changes and disconnect are published as
//! ordinary events (`user.connected`, `user.joined_room`, `user.left_room`,
//! `user.disconnected`), so plugins and replays see them like any producer's.
//!
//! The user is the token's subject (a JWT's `sub`, a static token's `name`), else an
//! anonymous id made from the connection's. Each change is published once: joining a room
//! the client is already in says nothing. One task appends them in the order they happened,
//! so one connection's events keep their order in the log (they share the user's key).
//!
//! Each change costs the log an event that every plugin reads, so with presence on a token
//! may make at most `max_changes_per_minute` of them (connects, joins, leaves; its
//! connections together): past that a connect or a room change is refused, never applied
//! without its event. A host that stops or crashes publishes no `user.disconnected` for the
//! clients it had.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::auth::{Grant, ROOM_ALL};
use crate::envelope::{Envelope, now_rfc3339};
use crate::log::{AppendItem, EventLog, LogError};
use crate::routing::Routing;

/// The `[presence]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// Publish presence events for fan-out clients (off by default).
    pub enabled: bool,
    /// Presence events one token may cause a minute (its connections together).
    pub max_changes_per_minute: u32,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig { enabled: false, max_changes_per_minute: 600 }
    }
}

/// A connect or room change refused: the token made too many presence changes lately.
#[derive(Debug, thiserror::Error)]
#[error(
    "too many presence changes for this token: at most {0} a minute (presence.max_changes_per_minute); \
     try again later"
)]
pub struct TooManyChanges(u32);

/// The `source` of the host's presence events; producers may not use it.
pub const SOURCE: &str = "owlery";

/// Presence events waiting to be appended; past this many (the log refusing them for a
/// long while) new ones are dropped and logged rather than held in memory.
const QUEUE: usize = 65_536;
/// Longest wait between attempts at appending a round the log refused.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Tokens remembered by the rate limit before idle ones are forgotten.
const REMEMBERED: usize = 10_000;

/// Where connections report; a no-op when presence is off.
#[derive(Clone, Default)]
pub struct Presence {
    queue: Option<mpsc::Sender<Envelope>>,
    budgets: Arc<Budgets>,
}

/// Presence changes each token may still make: a bucket per token subject (per address for
/// clients that name no user), refilled at
/// `per_minute` a minute, holding at most a minute's worth.
#[derive(Default)]
struct Budgets {
    per_minute: u32,
    buckets: Mutex<std::collections::HashMap<String, (f64, std::time::Instant)>>,
}

impl Budgets {
    fn take(&self, subject: &str, cost: usize) -> Result<(), TooManyChanges> {
        let full = f64::from(self.per_minute);
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > REMEMBERED {
            // A bucket idle for a minute is full again: forgetting it changes nothing.
            buckets.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(60));
        }
        let (tokens, at) = buckets.entry(subject.to_owned()).or_insert((full, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * full / 60.0).min(full);
        *at = now;
        if *tokens < cost as f64 {
            return Err(TooManyChanges(self.per_minute));
        }
        *tokens -= cost as f64;
        Ok(())
    }
}

impl Presence {
    /// Presence off: connections report nothing.
    pub fn disabled() -> Presence {
        Presence::default()
    }

    /// Presence on: the task that appends what connections report, in order, to `log`
    /// (run it for the life of the host).
    pub fn start(
        config: &PresenceConfig,
        log: Arc<dyn EventLog>,
        routing: Arc<Routing>,
    ) -> (Presence, impl Future<Output = ()> + Send + use<>) {
        let (queue, events) = mpsc::channel(QUEUE);
        let budgets = Arc::new(Budgets { per_minute: config.max_changes_per_minute, ..Budgets::default() });
        (Presence { queue: Some(queue), budgets }, append_all(events, log, routing))
    }

    /// A client connected in `rooms` (`all` aside) over `transport`; it reports until it
    /// is dropped, which says it disconnected. Refused when its token has made too many
    /// changes lately (the client is then to be turned away).
    /// `peer` is the client's address: the budget of a client that names no user (no
    /// token, or one without a subject) is its address's, not one shared by every
    /// anonymous client (where one of them could use it all up for the rest).
    pub fn connect<'r>(
        &self,
        grant: &Grant,
        peer: Option<std::net::IpAddr>,
        transport: &'static str,
        rooms: impl IntoIterator<Item = &'r String>,
    ) -> Result<Connection, TooManyChanges> {
        let rooms: Vec<&String> = rooms.into_iter().filter(|r| r.as_str() != ROOM_ALL).collect();
        let id = Uuid::new_v4();
        let subject = match (&grant.user, peer) {
            (Some(_), _) => grant.subject.clone(),
            (None, Some(peer)) => format!("{}@{peer}", grant.subject),
            (None, None) => grant.subject.clone(),
        };
        let connection = Connection {
            presence: self.clone(),
            user: grant.user.clone().unwrap_or_else(|| format!("anonymous:{id}")),
            subject,
            id,
            transport,
            rooms: Mutex::new(BTreeSet::new()),
            closed: std::sync::atomic::AtomicBool::new(true),
        };
        if self.queue.is_none() {
            return Ok(connection);
        }
        // Its connect, its rooms and, later, its disconnect.
        self.budgets.take(&connection.subject, rooms.len() + 2)?;
        connection.closed.store(false, std::sync::atomic::Ordering::Release);
        connection.emit("user.connected", json!({}));
        connection.rooms_now(rooms);
        Ok(connection)
    }
}

/// One connected client, as presence sees it.
pub struct Connection {
    presence: Presence,
    user: String,
    /// Whose budget its changes come out of.
    subject: String,
    id: Uuid,
    transport: &'static str,
    /// The rooms it is in (`all` aside), as last reported.
    /// Held while a change is reported, so that its events are queued in the order the
    /// changes were made.
    rooms: Mutex<BTreeSet<String>>,
    /// Disconnected (or never reporting: presence off, or refused).
    closed: std::sync::atomic::AtomicBool,
}

impl Connection {
    /// Whether the client may change up to `rooms` rooms now (its token's budget allows
    /// it); ask before applying the change.
    pub fn permit(&self, rooms: usize) -> Result<(), TooManyChanges> {
        if self.presence.queue.is_none() || rooms == 0 {
            return Ok(());
        }
        self.presence.budgets.take(&self.subject, rooms)
    }

    /// The client's rooms are now `rooms`: a `user.joined_room` for each new one, a
    /// `user.left_room` for each it is no longer in.
    pub fn rooms_now<'r>(&self, rooms: impl IntoIterator<Item = &'r String>) {
        let mut known = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let now: BTreeSet<String> = rooms.into_iter().filter(|r| r.as_str() != ROOM_ALL).cloned().collect();
        for room in now.difference(&known) {
            self.emit("user.joined_room", json!({ "room": room }));
        }
        for room in known.difference(&now) {
            self.emit("user.left_room", json!({ "room": room }));
        }
        *known = now;
    }

    /// It disconnected (also said when it is dropped; said once).
    pub fn close(&self) {
        let known = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if self.closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let rooms: Vec<&String> = known.iter().collect();
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
            source: SOURCE.to_owned(),
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
        // However long the log cannot take them (a full disk, Iggy down): like the outbox,
        // nothing accepted is dropped; meanwhile the queue fills, and past it new changes are.
        // An append refused for what is in it would be refused for ever: each event is then
        // tried alone, and one refused alone is dropped (logged), not retried for good.
        let Err(error) = append_until_taken_or_refused(&*log, items.clone()).await else { continue };
        tracing::warn!(%error, events = items.len(), "the log refused presence events; trying each alone");
        for item in items {
            let event_type = item.envelope.event_type.clone();
            if let Err(error) = append_until_taken_or_refused(&*log, vec![item]).await {
                tracing::error!(%error, event_type, "the log refused a presence event; dropped");
            }
        }
    }
}

/// Append `items`, again and again while the log fails for reasons of its own; the error
/// once it refuses them for what they are.
async fn append_until_taken_or_refused(log: &dyn EventLog, items: Vec<AppendItem>) -> Result<(), LogError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match log.append(items.clone()).await {
            Ok(_) => return Ok(()),
            Err(error) if crate::outbox::is_refusal(&error) => return Err(error),
            Err(error) => {
                tracing::warn!(%error, events = items.len(), "appending presence events failed; trying again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::embedded::EmbeddedLog;
    use crate::log::failing::Failing;
    use crate::log::{StorageError, Unavailable};
    use std::sync::atomic::{AtomicU32, Ordering};

    fn user(name: &str) -> Grant {
        Grant { user: Some(name.into()), subject: name.into(), ..Grant::everything() }
    }

    /// Presence events of `log`'s topic, by user, as appended.
    async fn users_in(log: &dyn EventLog) -> Vec<String> {
        let records = log.poll("presence-events", 0, 0, 100).await.unwrap();
        let envelope = |r: &crate::log::Record| Envelope::from_bytes(&r.payload).unwrap();
        records.iter().map(|r| envelope(r).user_id.unwrap()).collect()
    }

    #[tokio::test]
    async fn an_event_the_log_refuses_is_dropped_and_the_rest_go_out_and_outages_are_waited_out() {
        let dir = tempfile::tempdir().unwrap();
        let unavailable = Arc::new(AtomicU32::new(3));
        let left = unavailable.clone();
        // Refuses anything of user "bad", every time; first fails three times as a log that is down.
        let fail = move |items: &[AppendItem]| -> Option<LogError> {
            if left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Some(Unavailable::Closing.into());
            }
            items.iter().any(|i| i.envelope.user_id.as_deref() == Some("bad")).then(|| {
                StorageError::Topic { topic: "presence-events".into(), reason: "refused for the test".into() }.into()
            })
        };
        let log = Arc::new(Failing::local(EmbeddedLog::open(dir.path(), 1).unwrap(), fail));
        log.ensure_topics(&["presence-events".into()]).await.unwrap();
        let config = PresenceConfig { enabled: true, max_changes_per_minute: 600 };
        let (presence, task) = Presence::start(&config, log.clone(), Arc::new(Routing::default()));
        let task = tokio::spawn(task);
        // Queued before the task runs: one round, with the refused one in the middle.
        let connections: Vec<Connection> = ["ana", "bad", "bo"]
            .iter()
            .map(|name| presence.connect(&user(name), None, "websocket", std::iter::empty()).unwrap())
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while users_in(&*log).await.len() < 2 {
            assert!(std::time::Instant::now() < deadline, "presence stopped: {:?}", users_in(&*log).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(unavailable.load(Ordering::SeqCst), 0, "the outage was waited out");
        assert_eq!(users_in(&*log).await, ["ana", "bo"], "the others went out, in order");
        // And presence goes on after it.
        drop(connections);
        while users_in(&*log).await.len() < 4 {
            assert!(std::time::Instant::now() < deadline, "presence stopped: {:?}", users_in(&*log).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(users_in(&*log).await, ["ana", "bo", "ana", "bo"]);
        task.abort();
    }
}
