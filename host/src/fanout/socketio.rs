//! The Socket.IO transport, for browsers that already speak it: the same rooms, resume
//! offsets, notices and tokens as `/ws`, served by socketioxide at `/socket.io/`. Each
//! broadcast is emitted as an event named after its event type with `:` for `.`
//! (`incident:created`), carrying `{room, offset, plugin, event}`.
//!
//! A client sends `auth: {token, rooms, since, epoch}` when it connects, and `subscribe` /
//! `unsubscribe` with a list of rooms later. After `since` it first gets what it missed
//! (with `gap` and `reset` events where `/ws` sends those notices; possibly a frame it also
//! gets live: deduplicate by `offset`).

use std::sync::Arc;

use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::extract::{SocketRef, TryData};
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

/// Set up the default namespace; returns the layer to add to the router.
pub fn layer(auth: Arc<Auth>, hub: Hub) -> (socketioxide::layer::SocketIoLayer, SocketIo) {
    let (layer, io) = SocketIo::builder().max_payload(hub.limits().max_message as u64).build_layer();
    io.ns("/", move |socket: SocketRef, TryData(hello): TryData<Value>| {
        let (auth, hub) = (auth.clone(), hub.clone());
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
            socket.join(rooms.clone());
            catch_up(&socket, &hub, &rooms, resume(&hello)).await;
            on_room_changes(&socket, grant, hub.limits().max_rooms);
        }
    });
    (layer, io)
}

/// Emit what a resuming client missed, with the same notices as `/ws`.
async fn catch_up(socket: &SocketRef, hub: &Hub, rooms: &[String], resume: Resume) {
    let (_, start) = hub.start(resume).await;
    if let Some(notice) = &start.reset {
        let _ = socket.emit("reset", notice);
    }
    let Some(after) = start.after else { return };
    let mut pages = CatchUp::new(after);
    while let Ok(Some(page)) = pages.next_page(hub.store(), |room| rooms.iter().any(|r| r == room)) {
        for item in page {
            let _ = match item {
                Item::Notice(notice) => socket.emit("gap", &notice),
                Item::Record(record) => socket.emit(event_name(&record), &frame(&record)),
            };
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

/// Emit every live broadcast to its room, in offset order.
pub async fn bridge(io: SocketIo, mut live: broadcast::Receiver<Arc<Live>>) {
    loop {
        match live.recv().await {
            Ok(live) => {
                let record = &live.record;
                let _ = io.to(record.room.clone()).emit(event_name(record), &frame(record)).await;
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "Socket.IO fell behind the fan-out log");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
