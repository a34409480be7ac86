//! The Socket.IO transport, for browsers that already speak it: the same rooms, resume
//! offsets, notices and tokens as `/ws`, served by socketioxide at `/socket.io/`. Each
//! broadcast is emitted as an event named after its cause's event type with `:` for `.`
//! (`incident:created`), with two arguments: what the plugin broadcast, as it broadcast it
//! (so a client written for another Socket.IO server reads `data => data.incident`), and
//! `{room, offset, plugin, eventType}`, which is where the resume offset travels.
//!
//! A client sends `auth: {token, rooms, since, epoch}` when it connects, and `subscribe` /
//! `unsubscribe` with a list of rooms later. After `since` it first gets what it missed
//! (with `gap` and `reset` events where `/ws` sends those notices; possibly a frame it also
//! gets live: deduplicate by `offset`).
//!
//! Live broadcasts go to each socket through a queue of its own, bounded like `/ws`'s
//! (`client_queue` frames, `client_queue_bytes` bytes), drained by a task per socket into
//! socketioxide's small packet buffer. Nothing is dropped silently: catch-up
//! waits (asynchronously, up to a limit) for room in a slow client's queue, and a socket
//! that misses anything (its queue full when a live broadcast comes, a catch-up that could
//! not finish, the bridge itself falling behind) gets nothing more and is disconnected
//! (reason `io server disconnect`; retried until its queue takes the disconnect), to
//! reconnect with `since` = the last offset it has seen in order.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use socketioxide::SocketError;
use socketioxide::SocketIo;
use socketioxide::extract::{SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::socket::Sid;
use tokio::sync::{broadcast, mpsc, watch};

use super::catch_up::{CatchUp, Item};
use super::{ClientLimits, Hub, Live, ROOM_ALL, Resume};
use crate::auth::{Auth, Grant, Scope};
use crate::presence::Connection;
use crate::store::FanoutRecord;

/// The Socket.IO event name of a broadcast: its cause's event type (for a record from
/// before that was kept, the payload's `eventType`), `.` written `:`.
fn event_name(record: &FanoutRecord, payload: &Value) -> String {
    let event_type = match record.event.as_str() {
        "" => payload.get("eventType").and_then(|t| t.as_str()),
        event => Some(event),
    };
    event_type.map_or_else(|| "broadcast".to_owned(), |t| t.replace('.', ":"))
}

/// A broadcast's emit: its name and its two arguments, the payload and where it stands.
fn emit_of(record: &FanoutRecord) -> (String, (Value, Value)) {
    let payload = serde_json::from_str::<Value>(&record.payload).unwrap_or(Value::Null);
    let meta = json!({
        "room": record.room,
        "offset": record.offset,
        "plugin": record.plugin,
        "eventType": record.event,
    });
    (event_name(record, &payload), (payload, meta))
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

/// The client's address, as the server's listener saw it.
fn peer_of(socket: &SocketRef) -> Option<std::net::IpAddr> {
    let info = socket.req_parts().extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()?;
    Some(info.0.ip())
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
        if self.set().insert(socket.id) {
            crate::metrics::metrics().slow_clients_cut.with_label_values(&["socket.io"]).inc();
        }
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

/// A broadcast as every socket emits it; `bytes` is what it counts against a queue.
struct Emit {
    name: String,
    args: (Value, Value),
    bytes: usize,
}

/// One socket's queue of live broadcasts.
struct Outgoing {
    queue: mpsc::Sender<Arc<Emit>>,
    /// Bytes queued and not yet handed to socketioxide.
    bytes: Arc<AtomicUsize>,
}

/// Every connected socket's queue.
#[derive(Clone, Default)]
struct Queues(Arc<std::sync::Mutex<HashMap<Sid, Outgoing>>>);

impl Queues {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Sid, Outgoing>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make `socket`'s queue, and the task that drains it into the socket.
    fn open(&self, socket: &SocketRef, limits: &ClientLimits, laggards: Laggards) {
        let (queue, mut pending) = mpsc::channel::<Arc<Emit>>(limits.queue.max(1));
        let bytes = Arc::new(AtomicUsize::new(0));
        self.map().insert(socket.id, Outgoing { queue, bytes: bytes.clone() });
        let socket = socket.clone();
        tokio::spawn(async move {
            while let Some(emit) = pending.recv().await {
                if !emit_waiting(&socket, &emit.name, &emit.args).await {
                    laggards.add(&socket);
                    return;
                }
                bytes.fetch_sub(emit.bytes, Ordering::AcqRel);
            }
        });
    }

    fn close(&self, sid: &Sid) {
        self.map().remove(sid);
    }

    /// Queue `emit` for `sid`; false when its queue is full in frames or bytes.
    fn push(&self, sid: &Sid, emit: &Arc<Emit>, max_bytes: usize) -> bool {
        let map = self.map();
        let Some(out) = map.get(sid) else { return true };
        let queued = out.bytes.load(Ordering::Acquire);
        if queued > 0 && queued + emit.bytes > max_bytes {
            return false;
        }
        out.bytes.fetch_add(emit.bytes, Ordering::AcqRel);
        match out.queue.try_send(emit.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                out.bytes.fetch_sub(emit.bytes, Ordering::AcqRel);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => true,
        }
    }
}

/// What the connect handler learned of a socket, for its `subscribe` / `unsubscribe`
/// handlers.
#[derive(Clone)]
struct Session {
    grant: Grant,
    presence: Arc<Connection>,
    /// Held while a room change is applied: socketioxide runs each message's handler as a
    /// task of its own, and a change checks the rooms it changes.
    changing: Arc<tokio::sync::Mutex<()>>,
}

/// Where a socket's connect handler puts its session (in the socket's extensions).
/// socketioxide acknowledges a connect before it runs the connect handler, so a client's
/// first `subscribe`, sent as soon as it is connected, may arrive before the handler has
/// run: the room handlers are registered by a middleware, before the acknowledgement, and
/// wait for the session.
#[derive(Clone)]
struct SessionSlot(Arc<watch::Sender<Option<Session>>>);

/// How long a room change waits for its socket's session before it is dropped (the
/// socket was refused, or the host is starved).
const SESSION_WAIT: Duration = Duration::from_secs(10);

/// What the bridge needs: the server, the sockets' queues, and the sockets to cut off.
pub struct Bridge {
    io: SocketIo,
    queues: Queues,
    laggards: Laggards,
    max_bytes: usize,
}

/// Packets socketioxide buffers per socket; the backlog waits in the socket's own queue.
const SOCKETIO_BUFFER: usize = 64;

/// Set up the default namespace; returns the layer to add to the router, and what
/// `bridge` runs on.
pub fn layer(auth: Arc<Auth>, hub: Hub) -> (socketioxide::layer::SocketIoLayer, Bridge) {
    let laggards = Laggards::default();
    let queues = Queues::default();
    let (for_sockets, queues_for_sockets) = (laggards.clone(), queues.clone());
    let limits = *hub.limits();
    // `max_payload` bounds long-polling bodies only; WebSocket messages and frames have
    // their own limits (64 MiB by default), so all three are set.
    let (layer, io) = SocketIo::builder()
        .max_payload(limits.max_message as u64)
        .ws_max_message_size(limits.max_message)
        .ws_max_frame_size(limits.max_message)
        .max_buffer_size(SOCKETIO_BUFFER)
        .build_layer();
    let max_rooms = limits.max_rooms;
    let register_room_handlers = move |socket: SocketRef| async move {
        let (slot, session) = watch::channel(None);
        socket.extensions.insert(SessionSlot(Arc::new(slot)));
        on_room_changes(&socket, session, max_rooms);
        Ok::<(), std::convert::Infallible>(())
    };
    let connect = move |socket: SocketRef, TryData(hello): TryData<Value>| {
        let (auth, hub, laggards, queues) =
            (auth.clone(), hub.clone(), for_sockets.clone(), queues_for_sockets.clone());
        async move {
            // Its place among `max_clients`, held until the socket is gone.
            let Some(slot) = hub.admit() else {
                return refuse(&socket, "too many clients connected (max_clients); try again later".into(), true);
            };
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
            // Says `user.disconnected` when the socket goes.
            let presence = match hub.presence().connect(&grant, peer_of(&socket), "socket.io", rooms.iter()) {
                Ok(presence) => Arc::new(presence),
                Err(e) => return refuse(&socket, e.to_string(), true),
            };
            rooms.push(ROOM_ALL.to_owned());
            // A socket lives no longer than its token (the timer goes with the socket).
            let expiry = grant.time_left().map(|left| {
                let expiring = socket.clone();
                let timer = tokio::spawn(async move {
                    tokio::time::sleep(left).await;
                    if expiring.connected() {
                        refuse(&expiring, "the token expired".into(), true);
                    }
                });
                timer.abort_handle()
            });
            // Its queue, given back (with its place) when it goes.
            queues.open(&socket, hub.limits(), laggards.clone());
            let (on_close, slot, gone) = (queues.clone(), Arc::new(slot), presence.clone());
            socket.on_disconnect(move |socket: SocketRef| {
                let _held = &slot;
                on_close.close(&socket.id);
                gone.close();
                if let Some(timer) = &expiry {
                    timer.abort();
                }
                async {}
            });
            // Joined before catch-up, so nothing committed meanwhile is missed (a record may
            // come both ways: clients deduplicate by offset).
            socket.join(rooms.clone());
            // Room changes are heard from now on (after the first rooms are joined, so they
            // see them), during catch-up too.
            if let Some(SessionSlot(slot)) = socket.extensions.get::<SessionSlot>() {
                slot.send_replace(Some(Session { grant, presence, changing: Arc::default() }));
            }
            if !catch_up(&socket, &hub, &rooms, resume(&hello)).await {
                laggards.add(&socket);
            }
        }
    };
    io.ns("/", connect.with(register_room_handlers));
    (layer, Bridge { io, queues, laggards, max_bytes: limits.queue_bytes })
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
        let page = match pages.next_page_blocking(hub.store(), rooms.iter().cloned().collect()).await {
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
                Item::Record(record) => {
                    let (name, args) = emit_of(&record);
                    emit_waiting(socket, &name, &args).await
                }
            };
            if !sent {
                return false;
            }
        }
    }
}

/// Emit, waiting while the socket's queue is full; false (the socket disconnected) when it
/// is closed or stays full for `CATCH_UP_STALL`.
async fn emit_waiting<T: serde::Serialize + ?Sized>(socket: &SocketRef, name: &str, data: &T) -> bool {
    let deadline = tokio::time::Instant::now() + CATCH_UP_STALL;
    loop {
        match socket.emit(name, data) {
            Ok(()) => {
                crate::metrics::metrics().frames("socket.io", 1);
                return true;
            }
            Err(socketioxide::SendError::Socket(SocketError::InternalChannelFull))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(error) => {
                tracing::info!(%error, "disconnecting a Socket.IO client that stopped taking what it is sent");
                return false;
            }
        }
    }
}

/// `subscribe` and `unsubscribe` with a list of rooms; answered with `rooms` (the rooms
/// joined or left) or `error`. Each waits for the socket's session (see `SessionSlot`).
fn on_room_changes(socket: &SocketRef, session: watch::Receiver<Option<Session>>, max_rooms: usize) {
    async fn session_of(mut session: watch::Receiver<Option<Session>>) -> Option<Session> {
        let ready = tokio::time::timeout(SESSION_WAIT, session.wait_for(Option::is_some)).await;
        ready.ok()?.ok().and_then(|s| s.clone())
    }
    fn rooms_now(socket: &SocketRef, presence: &Connection) {
        let rooms: Vec<String> = socket.rooms().iter().map(|r| r.to_string()).collect();
        presence.rooms_now(&rooms);
    }
    let for_unsubscribe = session.clone();
    socket.on("subscribe", move |socket: SocketRef, TryData(wanted): TryData<Vec<String>>| async move {
        let Some(Session { grant, presence, changing }) = session_of(session).await else { return };
        let _changing = changing.lock().await;
        let wanted = wanted.unwrap_or_default();
        if let Some(denied) = wanted.iter().find(|r| !grant.may_join(r)) {
            return refuse(&socket, format!("the token may not join room {denied:?}"), false);
        }
        let mut after: std::collections::HashSet<String> = socket.rooms().iter().map(|r| r.to_string()).collect();
        after.extend(wanted.iter().cloned());
        if after.len() > max_rooms + 1 {
            return refuse(&socket, format!("at most {max_rooms} rooms per client"), false);
        }
        if let Err(e) = presence.permit(wanted.len()) {
            return refuse(&socket, e.to_string(), false);
        }
        socket.join(wanted.clone());
        rooms_now(&socket, &presence);
        let _ = socket.emit("rooms", &wanted);
    });
    socket.on("unsubscribe", move |socket: SocketRef, TryData(rooms): TryData<Vec<String>>| async move {
        let Some(Session { presence, changing, .. }) = session_of(for_unsubscribe).await else { return };
        let _changing = changing.lock().await;
        let rooms: Vec<String> = rooms.unwrap_or_default().into_iter().filter(|r| r != ROOM_ALL).collect();
        if let Err(e) = presence.permit(rooms.len()) {
            return refuse(&socket, e.to_string(), false);
        }
        socket.leave(rooms.clone());
        rooms_now(&socket, &presence);
        let _ = socket.emit("rooms", &rooms);
    });
}

/// Emit every live broadcast to its room, in offset order. A socket whose queue is full
/// misses that broadcast, so it is cut off rather than left with a silent gap; so is every
/// socket if the bridge itself falls behind the hub.
pub async fn bridge(bridge: Bridge, mut live: broadcast::Receiver<Arc<Live>>) {
    let Bridge { io, queues, laggards, max_bytes } = bridge;
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
                let (name, args) = emit_of(record);
                let emit = Arc::new(Emit { name, args, bytes: live.frame.len() });
                for socket in io.to(record.room.clone()).sockets() {
                    if laggards.contains(&socket.id) {
                        continue;
                    }
                    if !queues.push(&socket.id, &emit, max_bytes) {
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
