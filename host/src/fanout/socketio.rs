//! The Socket.IO transport, for browsers that already speak it: the same rooms, resume
//! offsets, notices and tokens as `/ws`, served by socketioxide at `/socket.io/`. Each
//! broadcast is emitted as an event named after its event type with `:` for `.`
//! (`incident:created`), carrying `{room, offset, plugin, event}`.
//!
//! A client sends `auth: {token, rooms, since, epoch}` when it connects, and `subscribe` /
//! `unsubscribe` with a list of rooms later. After `since` it first gets what it missed
//! (with `gap` and `reset` events where `/ws` sends those notices; possibly a frame it also
//! gets live: deduplicate by `offset`).
//!
//! Each socket's queue holds `client_queue` packets. Nothing is dropped silently: catch-up
//! waits (asynchronously, up to a limit) for room in a slow client's queue, and a socket
//! that misses anything (its queue full when a live broadcast comes, a catch-up that could
//! not finish, the bridge itself falling behind) gets nothing more and is disconnected
//! (reason `io server disconnect`; retried until its queue takes the disconnect), to
//! reconnect with `since` = the last offset it has seen in order.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use socketioxide::SocketError;
use socketioxide::SocketIo;
use socketioxide::extract::{SocketRef, TryData};
use socketioxide::socket::Sid;
use tokio::sync::broadcast;

use super::catch_up::{CatchUp, Item};
use super::{Hub, Live, ROOM_ALL, Resume};
use crate::auth::{Auth, Grant, Scope};
use crate::store::FanoutRecord;

/// The Socket.IO event name of a broadcast.
fn event_name(record: &FanoutRecord) -> String {
    let payload: Value = serde_json::from_str(&record.payload).unwrap_or(Value::Null);
    payload.get("eventType").and_then(|t| t.as_str()).map_or_else(|| "broadcast".to_owned(), |t| t.replace('.', ":"))
}

fn frame(record: &FanoutRecord) -> Value {
    json!({
        "room": record.room,
        "offset": record.offset,
        "plugin": record.plugin,
        "event": serde_json::from_str::<Value>(&record.payload).unwrap_or(Value::Null),
    })
}

/// Where a client asked to start: `since` -1 is everything retained, an offset is after it
/// (from the log of `epoch`, if given), none is live only.
fn resume(hello: &Value) -> Resume {
    match hello.get("since").and_then(|s| s.as_i64()) {
        None => Resume::Live,
        Some(since) => match u64::try_from(since) {
            Ok(offset) => Resume::After { offset, epoch: hello.get("epoch").and_then(|e| e.as_u64()) },
            Err(_) => Resume::All,
        },
    }
}

fn refuse(socket: &SocketRef, error: String, disconnect: bool) {
    let _ = socket.emit("error", &json!({ "error": error }));
    if disconnect {
        let _ = socket.clone().disconnect();
    }
}

/// Sockets that missed something and must be disconnected; they get nothing more.
#[derive(Clone, Default)]
pub struct Laggards(Arc<std::sync::Mutex<HashSet<Sid>>>);

impl Laggards {
    fn add(&self, socket: &SocketRef) {
        self.set().insert(socket.id);
        // Right away if its queue takes the disconnect; else the bridge tries again.
        if socket.clone().disconnect().is_ok() {
            self.set().remove(&socket.id);
        }
    }

    fn contains(&self, sid: &Sid) -> bool {
        self.set().contains(sid)
    }

    /// Disconnect again those whose queues refused it; forget the ones gone.
    fn retry(&self, io: &SocketIo) {
        self.set().retain(|sid| match io.get_socket(*sid) {
            Some(socket) => socket.disconnect().is_err(),
            None => false,
        });
    }

    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<Sid>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the bridge needs: the server, and the sockets to cut off.
pub struct Bridge {
    io: SocketIo,
    laggards: Laggards,
}

/// Set up the default namespace; returns the layer to add to the router, and what
/// `bridge` runs on.
pub fn layer(auth: Arc<Auth>, hub: Hub) -> (socketioxide::layer::SocketIoLayer, Bridge) {
    let laggards = Laggards::default();
    let for_sockets = laggards.clone();
    let limits = hub.limits();
    // `max_payload` bounds long-polling bodies only; WebSocket messages and frames have
    // their own limits (64 MiB by default), so all three are set.
    let (layer, io) = SocketIo::builder()
        .max_payload(limits.max_message as u64)
        .ws_max_message_size(limits.max_message)
        .ws_max_frame_size(limits.max_message)
        .max_buffer_size(limits.queue.max(1))
        .build_layer();
    io.ns("/", move |socket: SocketRef, TryData(hello): TryData<Value>| {
        let (auth, hub, laggards) = (auth.clone(), hub.clone(), for_sockets.clone());
        async move {
            // Its place among `max_clients`, held until the socket is gone.
            let Some(slot) = hub.admit() else {
                return refuse(&socket, "too many clients connected (max_clients); try again later".into(), true);
            };
            let slot = Arc::new(slot);
            socket.on_disconnect(move |_: SocketRef| {
                let _held = &slot;
                async {}
            });
            let hello = hello.unwrap_or(Value::Null);
            let token = hello.get("token").and_then(|t| t.as_str());
            let grant = match auth.require(token, Scope::Subscribe) {
                Ok(grant) => grant,
                Err(e) => return refuse(&socket, e.to_string(), true),
            };
            let mut rooms: Vec<String> = hello
                .get("rooms")
                .and_then(|r| r.as_array())
                .map(|r| r.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            if let Some(denied) = rooms.iter().find(|r| !grant.may_join(r)) {
                return refuse(&socket, format!("the token may not join room {denied:?}"), true);
            }
            if rooms.len() > hub.limits().max_rooms {
                return refuse(&socket, format!("at most {} rooms per client", hub.limits().max_rooms), true);
            }
            rooms.push(ROOM_ALL.to_owned());
            // Room changes are heard during catch-up too.
            on_room_changes(&socket, grant, hub.limits().max_rooms);
            // Joined before catch-up, so nothing committed meanwhile is missed (a record may
            // come both ways: clients deduplicate by offset).
            socket.join(rooms.clone());
            if !catch_up(&socket, &hub, &rooms, resume(&hello)).await {
                laggards.add(&socket);
            }
        }
    });
    (layer, Bridge { io, laggards })
}

/// How long catch-up waits for room in a slow client's queue before it gives up on it.
const CATCH_UP_STALL: Duration = Duration::from_secs(30);

/// Emit what a resuming client missed, with the same notices as `/ws`. A full queue is
/// waited on (without holding a thread); false when the client did not get all of it.
async fn catch_up(socket: &SocketRef, hub: &Hub, rooms: &[String], resume: Resume) -> bool {
    let (_, start) = hub.start(resume).await;
    if let Some(notice) = &start.reset
        && !emit_waiting(socket, "reset", notice).await
    {
        return false;
    }
    let Some(after) = start.after else { return true };
    let mut pages = CatchUp::new(after);
    loop {
        let page = match pages.next_page(hub.store(), |room| rooms.iter().any(|r| r == room)) {
            Ok(Some(page)) => page,
            Ok(None) => return true,
            Err(error) => {
                tracing::error!(%error, "reading the fan-out table for a Socket.IO catch-up failed");
                return false;
            }
        };
        for item in page {
            let sent = match item {
                Item::Notice(notice) => emit_waiting(socket, "gap", &notice).await,
                Item::Record(record) => emit_waiting(socket, &event_name(&record), &frame(&record)).await,
            };
            if !sent {
                return false;
            }
        }
    }
}

/// Emit, waiting while the socket's queue is full; false (the socket disconnected) when it
/// is closed or stays full for `CATCH_UP_STALL`.
async fn emit_waiting(socket: &SocketRef, name: &str, data: &Value) -> bool {
    let deadline = tokio::time::Instant::now() + CATCH_UP_STALL;
    loop {
        match socket.emit(name, data) {
            Ok(()) => return true,
            Err(socketioxide::SendError::Socket(SocketError::InternalChannelFull))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(error) => {
                tracing::info!(%error, "disconnecting a Socket.IO client that stopped taking its catch-up");
                return false;
            }
        }
    }
}

/// `subscribe` and `unsubscribe` with a list of rooms; answered with `rooms` (the rooms
/// joined or left) or `error`.
fn on_room_changes(socket: &SocketRef, grant: Grant, max_rooms: usize) {
    socket.on("subscribe", move |socket: SocketRef, TryData(wanted): TryData<Vec<String>>| async move {
        let wanted = wanted.unwrap_or_default();
        if let Some(denied) = wanted.iter().find(|r| !grant.may_join(r)) {
            return refuse(&socket, format!("the token may not join room {denied:?}"), false);
        }
        let mut after: std::collections::HashSet<String> = socket.rooms().iter().map(|r| r.to_string()).collect();
        after.extend(wanted.iter().cloned());
        if after.len() > max_rooms + 1 {
            return refuse(&socket, format!("at most {max_rooms} rooms per client"), false);
        }
        socket.join(wanted.clone());
        let _ = socket.emit("rooms", &wanted);
    });
    socket.on("unsubscribe", |socket: SocketRef, TryData(rooms): TryData<Vec<String>>| async move {
        let rooms: Vec<String> = rooms.unwrap_or_default().into_iter().filter(|r| r != ROOM_ALL).collect();
        socket.leave(rooms.clone());
        let _ = socket.emit("rooms", &rooms);
    });
}

/// Emit every live broadcast to its room, in offset order. A socket whose queue is full
/// misses that broadcast, so it is cut off rather than left with a silent gap; so is every
/// socket if the bridge itself falls behind the hub.
pub async fn bridge(bridge: Bridge, mut live: broadcast::Receiver<Arc<Live>>) {
    let Bridge { io, laggards } = bridge;
    let mut retry = tokio::time::interval(Duration::from_millis(100));
    loop {
        let received = tokio::select! {
            received = live.recv() => received,
            _ = retry.tick() => {
                laggards.retry(&io);
                continue;
            }
        };
        match received {
            Ok(live) => {
                let record = &live.record;
                let (name, frame) = (event_name(record), frame(record));
                for socket in io.to(record.room.clone()).sockets() {
                    if laggards.contains(&socket.id) {
                        continue;
                    }
                    if let Err(socketioxide::SendError::Socket(SocketError::InternalChannelFull)) =
                        socket.emit(&name, &frame)
                    {
                        tracing::info!(
                            offset = record.offset,
                            "disconnecting a Socket.IO client that fell too far behind"
                        );
                        laggards.add(&socket);
                    }
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "Socket.IO fell behind the fan-out log; disconnecting its clients to resume");
                for socket in io.sockets() {
                    laggards.add(&socket);
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
