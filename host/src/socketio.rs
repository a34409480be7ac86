//! Socket.IO for browsers that already speak it: the same rooms, resume offsets and tokens
//! as `/ws`, served by socketioxide at `/socket.io/`. Each broadcast is emitted as an event
//! named after its event type with `:` for `.` (`incident:created`), carrying
//! `{room, offset, plugin, event}`.
//!
//! A client sends `auth: {token, rooms, since}` when it connects, and `subscribe` with a
//! list of rooms later. After `since` it first gets what it missed (possibly a frame it also
//! gets live: deduplicate by `offset`).

use std::sync::Arc;

use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::extract::{SocketRef, TryData};
use tokio::sync::broadcast;

use crate::auth::{Auth, Scope};
use crate::fanout::ROOM_ALL;
use crate::store::{FanoutRecord, Store};

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

/// Set up the default namespace; returns the layer to add to the router.
pub fn layer(auth: Arc<Auth>, store: Arc<Store>) -> (socketioxide::layer::SocketIoLayer, SocketIo) {
    let (layer, io) = SocketIo::new_layer();
    io.ns("/", move |socket: SocketRef, TryData(hello): TryData<Value>| {
        let (auth, store) = (auth.clone(), store.clone());
        async move {
            let hello = hello.unwrap_or(Value::Null);
            let token = hello.get("token").and_then(|t| t.as_str());
            let grant = match auth.require(token, Scope::Subscribe) {
                Ok(grant) => grant,
                Err(e) => {
                    let _ = socket.emit("error", &json!({"error": e.to_string()}));
                    let _ = socket.disconnect();
                    return;
                }
            };
            let rooms: Vec<String> = hello
                .get("rooms")
                .and_then(|r| r.as_array())
                .map(|r| r.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            if let Some(denied) = rooms.iter().find(|r| !grant.may_join(r)) {
                let _ = socket.emit("error", &json!({"error": format!("the token may not join room {denied:?}")}));
                let _ = socket.disconnect();
                return;
            }
            socket.join(ROOM_ALL);
            socket.join(rooms.clone());
            if let Some(since) = hello.get("since").and_then(|s| s.as_i64()) {
                let mut from = u64::try_from(since + 1).unwrap_or(0);
                let mut joined = rooms.clone();
                joined.push(ROOM_ALL.to_owned());
                while let Ok((records, _)) = store.fanout_from(from, 1000) {
                    let Some(last) = records.last().map(|r| r.offset) else { break };
                    for record in records.iter().filter(|r| joined.contains(&r.room)) {
                        let _ = socket.emit(event_name(record), &frame(record));
                    }
                    from = last + 1;
                }
            }
            socket.on("subscribe", move |socket: SocketRef, TryData(wanted): TryData<Vec<String>>| async move {
                let wanted = wanted.unwrap_or_default();
                if let Some(denied) = wanted.iter().find(|r| !grant.may_join(r)) {
                    let _ = socket.emit("error", &json!({"error": format!("the token may not join room {denied:?}")}));
                    return;
                }
                socket.join(wanted.clone());
                let _ = socket.emit("rooms", &wanted);
            });
        }
    });
    (layer, io)
}

/// Emit every live broadcast to its room, in offset order.
pub async fn bridge(io: SocketIo, mut live: broadcast::Receiver<Arc<crate::fanout::Live>>) {
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
