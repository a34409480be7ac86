//! The fan-out hub: broadcasts committed by plugins, delivered to WebSocket clients by room.
//!
//! Every broadcast has an offset in the fan-out log (see `store`). A client that connects
//! with `since=<offset>` first gets what it missed from the store, then live records, with
//! no gap and no duplicate; if that offset is no longer retained it is told so.

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use tokio::sync::broadcast;

use crate::auth::Grant;
use crate::store::{FanoutRecord, Store};

/// Live records buffered per client before it counts as too slow.
const CLIENT_BUFFER: usize = 4096;
/// Records read from the store per page while catching a client up.
const CATCH_UP_PAGE: usize = 1000;
/// Room every client is in.
pub const ROOM_ALL: &str = "all";

#[derive(Clone)]
pub struct Hub {
    live: broadcast::Sender<Arc<FanoutRecord>>,
    store: Arc<Store>,
}

impl Hub {
    pub fn new(store: Arc<Store>) -> Hub {
        Hub { live: broadcast::channel(CLIENT_BUFFER).0, store }
    }

    /// Hand committed records to the connected clients.
    pub fn publish(&self, records: Vec<FanoutRecord>) {
        for record in records {
            // No receivers is fine: nobody is connected.
            let _ = self.live.send(Arc::new(record));
        }
    }

    /// The frame a client receives: `{"room", "offset", "event"}`; `event` is the payload.
    pub fn frame(record: &FanoutRecord) -> String {
        format!(
            r#"{{"room":{},"offset":{},"plugin":{},"event":{}}}"#,
            serde_json::Value::String(record.room.clone()),
            record.offset,
            serde_json::Value::String(record.plugin.clone()),
            record.payload
        )
    }

    /// Serve one WebSocket client in `rooms` (plus `all`), resuming after `since` if given.
    pub async fn serve(self, mut socket: WebSocket, grant: Grant, rooms: Vec<String>, since: Option<u64>) {
        let mut rooms: HashSet<String> = rooms.into_iter().filter(|r| !r.is_empty()).collect();
        rooms.insert(ROOM_ALL.to_owned());
        let mut live = self.live.subscribe();
        let hello = serde_json::json!({"type": "welcome", "rooms": sorted(&rooms), "next": self.store.fanout_next().unwrap_or(0)});
        if socket.send(Message::Text(hello.to_string().into())).await.is_err() {
            return;
        }
        // Everything up to `sent` has been delivered (or was not for this client).
        let mut sent: Option<u64> = since;
        if let Some(since) = since {
            match self.catch_up(&mut socket, &rooms, since).await {
                Ok(last) => sent = Some(last),
                Err(()) => return,
            }
        }
        loop {
            tokio::select! {
                record = live.recv() => match record {
                    Ok(record) => {
                        if sent.is_some_and(|s| record.offset <= s) {
                            continue;
                        }
                        sent = Some(record.offset);
                        if rooms.contains(&record.room) && socket.send(Message::Text(Hub::frame(&record).into())).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let resume = sent.map_or(String::new(), |s| format!(" since={s}"));
                        let reason = format!("too slow: reconnect with{resume}");
                        let _ = socket.send(Message::Close(Some(CloseFrame { code: 4008, reason: Utf8Bytes::from(reason) }))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                incoming = socket.recv() => match incoming {
                    Some(Ok(Message::Text(text))) => {
                        let reply = handle_client_message(&mut rooms, &grant, text.as_str());
                        if socket.send(Message::Text(reply.into())).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// Send the stored records after `since` for the client's rooms; returns the last
    /// offset covered.
    async fn catch_up(&self, socket: &mut WebSocket, rooms: &HashSet<String>, since: u64) -> Result<u64, ()> {
        let mut from = since + 1;
        loop {
            let (records, oldest) = self.store.fanout_from(from, CATCH_UP_PAGE).map_err(|_| ())?;
            if from < oldest {
                let notice = serde_json::json!({"type": "gap", "reason": "offset no longer retained", "requested": since, "oldest": oldest});
                socket.send(Message::Text(notice.to_string().into())).await.map_err(|_| ())?;
                from = oldest;
                continue;
            }
            let Some(last) = records.last().map(|r| r.offset) else { return Ok(from - 1) };
            for record in records.iter().filter(|r| rooms.contains(&r.room)) {
                socket.send(Message::Text(Hub::frame(record).into())).await.map_err(|_| ())?;
            }
            from = last + 1;
        }
    }
}

fn sorted(rooms: &HashSet<String>) -> Vec<&String> {
    let mut v: Vec<&String> = rooms.iter().collect();
    v.sort();
    v
}

/// `{"subscribe": [..]}` / `{"unsubscribe": [..]}` from a client; returns the reply frame.
fn handle_client_message(rooms: &mut HashSet<String>, grant: &Grant, text: &str) -> String {
    let Ok(serde_json::Value::Object(message)) = serde_json::from_str::<serde_json::Value>(text) else {
        return serde_json::json!({"type": "error", "error": "expected a JSON object like {\"subscribe\": [\"incident:1\"]}"}).to_string();
    };
    let names = |key: &str| -> Vec<String> {
        message
            .get(key)
            .and_then(|v| v.as_array())
            .map_or_else(Vec::new, |a| a.iter().filter_map(|r| r.as_str().map(str::to_owned)).collect())
    };
    if message.contains_key("subscribe") {
        let wanted = names("subscribe");
        if let Some(denied) = wanted.iter().find(|r| !grant.may_join(r)) {
            return serde_json::json!({"type": "error", "error": format!("the token may not join room {denied:?}")})
                .to_string();
        }
        rooms.extend(wanted.into_iter().filter(|r| !r.is_empty()));
    } else if message.contains_key("unsubscribe") {
        for room in names("unsubscribe") {
            if room != ROOM_ALL {
                rooms.remove(&room);
            }
        }
    } else if message.contains_key("ping") {
        return serde_json::json!({"type": "pong"}).to_string();
    } else {
        return serde_json::json!({"type": "error", "error": "unknown message; use subscribe or unsubscribe"})
            .to_string();
    }
    serde_json::json!({"type": "rooms", "rooms": sorted(rooms)}).to_string()
}
