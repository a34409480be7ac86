//! Fan-out: broadcasts committed by plugins, delivered to browsers by room.
//!
//! Every broadcast has an offset in the fan-out table (see `store`). A client that connects
//! with `since=<offset>` first gets what it missed (`catch_up`), then live records, with no
//! gap and no duplicate; if that offset is no longer retained, or is from another log, it is
//! told so. Two transports sit on top of the one hub: `/ws` (`ws`) and Socket.IO
//! (`socketio`).
//!
//! On a shared log (Iggy) the fan-out log is shared too: broadcasts are committed to the
//! outbox for the `owlery-fanout` topic, and every host mirrors that topic into its store
//! (`mirror`), so every host on the same Iggy serves the same records at the same offsets.

mod catch_up;
pub mod mirror;
pub mod socketio;
mod ws;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::broadcast;

pub use crate::auth::ROOM_ALL;
use crate::presence::Presence;
use crate::store::{FanoutRecord, Store};
pub use crate::topics::FANOUT as FANOUT_TOPIC;
pub use catch_up::Start;

/// How long a client resuming from an offset this host has not mirrored yet waits for it.
const MIRROR_CATCH_UP: Duration = Duration::from_secs(3);

/// What one client, and all of them together, may take.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Frames queued for one client; a client this far behind is disconnected.
    pub queue: usize,
    /// ... or this many bytes of frames (`/ws`).
    pub queue_bytes: usize,
    /// Largest message a client may send (`/ws` frames, Socket.IO packets).
    pub max_message: usize,
    /// Rooms one client may be in (besides `all`).
    pub max_rooms: usize,
    /// Clients connected at once, `/ws` and Socket.IO together; more are turned away.
    pub max_clients: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits { queue: 1024, queue_bytes: 8 << 20, max_message: 64 << 10, max_rooms: 100, max_clients: 10_000 }
    }
}

/// A connected client's place; given back when dropped (the client went).
pub type ClientSlot = tokio::sync::OwnedSemaphorePermit;

/// A committed record and its frame, made once for all the clients that get it.
pub struct Live {
    pub record: FanoutRecord,
    pub frame: Utf8Bytes,
}

#[derive(Clone)]
pub struct Hub {
    live: broadcast::Sender<Arc<Live>>,
    store: Arc<Store>,
    limits: ClientLimits,
    /// The fan-out log is a mirror of a shared one, which may be a little ahead of it.
    shared: bool,
    /// The mirror knows which shared log it mirrors (its epoch is that log's).
    mirroring: Arc<AtomicBool>,
    /// One permit per connected client.
    clients: Arc<tokio::sync::Semaphore>,
    /// Where clients' connects, room changes and disconnects are reported.
    presence: Presence,
}

/// Where a client starts.
#[derive(Debug, Clone, Copy)]
pub enum Resume {
    /// Live broadcasts only.
    Live,
    /// Everything after this offset, then live ones; `epoch` is the log the offset is from.
    After { offset: u64, epoch: Option<u64> },
    /// Everything retained, then live ones.
    All,
}

impl Hub {
    /// `shared`: the store's fan-out table mirrors a shared log (see `mirror`).
    pub fn new(store: Arc<Store>, limits: ClientLimits, shared: bool, presence: Presence) -> Hub {
        // The shared channel is only a hand-off to each client's own loop, which keeps up
        // unless the host is starved; each client's own queue bounds how far it may lag.
        Hub {
            live: broadcast::channel(limits.queue.max(1024) * 4).0,
            store,
            limits,
            shared,
            mirroring: Arc::default(),
            clients: Arc::new(tokio::sync::Semaphore::new(limits.max_clients)),
            presence,
        }
    }

    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    pub fn limits(&self) -> &ClientLimits {
        &self.limits
    }

    /// Clients connected now, `/ws` and Socket.IO together.
    pub fn connected(&self) -> usize {
        self.limits.max_clients.saturating_sub(self.clients.available_permits())
    }

    /// A place for one more client, or `None` when `max_clients` are connected.
    pub fn admit(&self) -> Option<ClientSlot> {
        self.clients.clone().try_acquire_owned().ok()
    }

    /// Every committed record from now on, in offset order.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Live>> {
        self.live.subscribe()
    }

    /// Hand committed records to the connected clients.
    pub fn publish(&self, records: Vec<FanoutRecord>) {
        for record in records {
            // No receivers is fine: nobody is connected.
            let frame = Utf8Bytes::from(Hub::frame(&record));
            let _ = self.live.send(Arc::new(Live { record, frame }));
        }
    }

    /// The frame a `/ws` client receives: `{"room", "offset", "plugin", "eventType",
    /// "event"}`; `event` is the payload, `eventType` its cause's type (left out for
    /// records from before it was kept).
    pub fn frame(record: &FanoutRecord) -> String {
        let event_type = if record.event.is_empty() {
            String::new()
        } else {
            format!(r#""eventType":{},"#, serde_json::Value::String(record.event.clone()))
        };
        format!(
            r#"{{"room":{},"offset":{},"plugin":{},{event_type}"event":{}}}"#,
            serde_json::Value::String(record.room.clone()),
            record.offset,
            serde_json::Value::String(record.plugin.clone()),
            record.payload
        )
    }

    /// Where a client asking for `resume` starts: subscribed to live records first (so
    /// nothing committed meanwhile is missed), then told the log's end and epoch. On a
    /// shared log this first waits (a little) for the mirror to meet the log and, for an
    /// offset another host served, to reach it.
    pub async fn start(&self, resume: Resume) -> (broadcast::Receiver<Arc<Live>>, Start) {
        let deadline = tokio::time::Instant::now() + MIRROR_CATCH_UP;
        let waiting = |next: u64| match resume {
            Resume::After { offset, .. } => next <= offset,
            _ => false,
        };
        while self.shared && !self.mirroring.load(Ordering::Acquire) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let live = self.live.subscribe();
        let mut next = self.store.fanout_next().unwrap_or(0);
        while self.shared && waiting(next) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            next = self.store.fanout_next().unwrap_or(0);
        }
        (live, Start::new(resume, next, self.store.epoch().unwrap_or(0)))
    }

    fn store(&self) -> &Arc<Store> {
        &self.store
    }
}
