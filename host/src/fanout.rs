//! The fan-out hub: broadcasts committed by plugins, delivered to WebSocket clients by room.
//!
//! Every broadcast has an offset in the fan-out log (see `store`). A client that connects
//! with `since=<offset>` first gets what it missed from the store, then live records, with
//! no gap and no duplicate; if that offset is no longer retained it is told so.
//!
//! On Iggy the fan-out log is shared: broadcasts are committed to the outbox for the
//! `owlery-fanout` topic, and every host mirrors that topic into its store (`mirror`), so
//! every host on the same Iggy serves the same records at the same offsets.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::auth::Grant;
use crate::log::{EventLog, LogError};
use crate::store::{BROADCAST_TYPE, FanoutRecord, Store};

/// The topic that holds the shared fan-out log (one partition: one order for every host).
pub use crate::topics::FANOUT as FANOUT_TOPIC;

/// Records read from the store per page while catching a client up.
const CATCH_UP_PAGE: usize = 1000;
/// Room every client is in.
pub const ROOM_ALL: &str = "all";
/// A ping this often; a client silent for three of these is gone.
const KEEP_ALIVE: Duration = Duration::from_secs(20);
/// How long one frame may wait for a client that is catching up before it counts as dead.
const CATCH_UP_STALL: Duration = Duration::from_secs(30);
/// How long a client resuming from an offset this host has not mirrored yet waits for it.
const MIRROR_CATCH_UP: Duration = Duration::from_secs(3);
/// Records read from the shared fan-out topic per poll.
const MIRROR_PAGE: usize = 1000;

/// How much a client may fall behind.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Frames queued for one client; a client this far behind is disconnected.
    pub queue: usize,
}

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
    mirroring: Arc<std::sync::atomic::AtomicBool>,
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

/// Why a client's connection ends.
enum Ending {
    Gone,
    TooSlow(Option<u64>),
    Silent,
}

impl Hub {
    /// `shared`: the store's fan-out table mirrors a shared log (see `mirror`).
    pub fn new(store: Arc<Store>, limits: ClientLimits, shared: bool) -> Hub {
        // The shared channel is only a hand-off to each client's own loop, which keeps up
        // unless the host is starved; each client's own queue bounds how far it may lag.
        Hub { live: broadcast::channel(limits.queue.max(1024) * 4).0, store, limits, shared, mirroring: Arc::default() }
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
    /// Frames go through a bounded queue to a writer of their own, so a client that does
    /// not read is cut off with a reason instead of holding anything up.
    pub async fn serve(self, socket: WebSocket, grant: Grant, rooms: Vec<String>, since: Resume) {
        let (sink, mut incoming) = socket.split();
        let (queue, outgoing) = mpsc::channel::<Message>(self.limits.queue.max(1));
        let (close_tx, close_rx) = oneshot::channel::<CloseFrame>();
        let writer = tokio::spawn(write_frames(sink, outgoing, close_rx));
        let ending = self.client_loop(&queue, &mut incoming, grant, rooms, since).await;
        let close = match ending {
            Ending::Gone => None,
            Ending::TooSlow(sent) => {
                let resume = sent.map_or(String::new(), |s| format!(" since={s}"));
                tracing::info!(last_offset = ?sent, "disconnecting a WebSocket client that fell too far behind");
                Some(CloseFrame { code: 4008, reason: Utf8Bytes::from(format!("too slow: reconnect with{resume}")) })
            }
            Ending::Silent => Some(CloseFrame { code: 4000, reason: Utf8Bytes::from("no answer to pings") }),
        };
        if let Some(frame) = close {
            let _ = close_tx.send(frame);
        }
        drop(queue);
        let _ = writer.await;
    }

    async fn client_loop(
        &self,
        queue: &mpsc::Sender<Message>,
        incoming: &mut futures_util::stream::SplitStream<WebSocket>,
        grant: Grant,
        rooms: Vec<String>,
        resume: Resume,
    ) -> Ending {
        let mut rooms: HashSet<String> = rooms.into_iter().filter(|r| !r.is_empty()).collect();
        rooms.insert(ROOM_ALL.to_owned());
        if self.shared {
            // Right after start the mirror may not have met the shared log yet.
            let deadline = tokio::time::Instant::now() + MIRROR_CATCH_UP;
            while !self.mirroring.load(Ordering::Acquire) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let mut live = self.live.subscribe();
        let mut next = self.store.fanout_next().unwrap_or(0);
        if let (true, Resume::After { offset, .. }) = (self.shared, resume) {
            // An offset served by another host on the same log may not be mirrored here yet.
            let deadline = tokio::time::Instant::now() + MIRROR_CATCH_UP;
            while next <= offset && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
                next = self.store.fanout_next().unwrap_or(0);
            }
        }
        let epoch = self.store.epoch().unwrap_or(0);
        let hello = serde_json::json!({"type": "welcome", "rooms": sorted(&rooms), "next": next, "epoch": epoch});
        if queue.send(Message::Text(hello.to_string().into())).await.is_err() {
            return Ending::Gone;
        }
        // An offset from another epoch, or past the end, is from a log that was reset: say
        // so, and send everything retained.
        let resume = match resume {
            Resume::After { offset, epoch: known } if known.is_some_and(|e| e != epoch) || offset >= next => {
                let notice = serde_json::json!({"type": "reset", "reason": "the fan-out log was reset; sending everything retained", "requested": offset, "epoch": epoch});
                if queue.send(Message::Text(notice.to_string().into())).await.is_err() {
                    return Ending::Gone;
                }
                Resume::All
            }
            other => other,
        };
        // Everything up to `sent` has been delivered (or was not for this client).
        let mut sent: Option<u64> = None;
        let catch_up_after = match resume {
            Resume::Live => None,
            Resume::After { offset, .. } => Some(Some(offset)),
            Resume::All => Some(None),
        };
        if let Some(after) = catch_up_after {
            match self.catch_up(queue, &rooms, after).await {
                Ok(last) => sent = last,
                Err(ending) => return ending,
            }
        }
        let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
        let mut heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                live_record = live.recv() => match live_record {
                    Ok(live_record) => {
                        let record = &live_record.record;
                        if sent.is_some_and(|s| record.offset <= s) {
                            continue;
                        }
                        if rooms.contains(&record.room) {
                            match queue.try_send(Message::Text(live_record.frame.clone())) {
                                Ok(()) => {}
                                Err(mpsc::error::TrySendError::Full(_)) => return Ending::TooSlow(sent),
                                Err(mpsc::error::TrySendError::Closed(_)) => return Ending::Gone,
                            }
                        }
                        sent = Some(record.offset);
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => return Ending::TooSlow(sent),
                    Err(broadcast::error::RecvError::Closed) => return Ending::Gone,
                },
                message = incoming.next() => {
                    heard = tokio::time::Instant::now();
                    match message {
                        Some(Ok(Message::Text(text))) => {
                            let reply = handle_client_message(&mut rooms, &grant, text.as_str());
                            if queue.try_send(Message::Text(reply.into())).is_err() {
                                return Ending::TooSlow(sent);
                            }
                        }
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ending::Gone,
                        Some(Ok(_)) => {}
                    }
                }
                _ = keep_alive.tick() => {
                    if heard.elapsed() > KEEP_ALIVE * 3 {
                        return Ending::Silent;
                    }
                    if queue.try_send(Message::Ping(Default::default())).is_err() {
                        return Ending::TooSlow(sent);
                    }
                }
            }
        }
    }

    /// Queue the stored records after `since` (`None`: from offset zero) for the client's
    /// rooms; returns the last offset covered, if any.
    async fn catch_up(
        &self,
        queue: &mpsc::Sender<Message>,
        rooms: &HashSet<String>,
        since: Option<u64>,
    ) -> Result<Option<u64>, Ending> {
        let mut covered = since;
        let send = |text: String| async move {
            match tokio::time::timeout(CATCH_UP_STALL, queue.send(Message::Text(text.into()))).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(Ending::Gone),
                Err(_) => Err(Ending::TooSlow(since)),
            }
        };
        loop {
            let from = covered.map_or(0, |c| c + 1);
            let (records, oldest) = self.store.fanout_from(from, CATCH_UP_PAGE).map_err(|_| Ending::Gone)?;
            if from < oldest {
                let notice = serde_json::json!({"type": "gap", "reason": "offset no longer retained", "requested": since, "oldest": oldest});
                send(notice.to_string()).await?;
                covered = oldest.checked_sub(1);
                continue;
            }
            let Some(last) = records.last().map(|r| r.offset) else { return Ok(covered) };
            for record in records.iter().filter(|r| rooms.contains(&r.room)) {
                send(Hub::frame(record)).await?;
            }
            covered = Some(last);
        }
    }
}

/// Keep the store's fan-out table a mirror of the shared fan-out topic, and hand new records
/// to the connected clients. Runs for the life of the host.
pub async fn mirror(log: Arc<dyn EventLog>, store: Arc<Store>, hub: Hub) {
    let mut changes = log.changes();
    let mut warned = false;
    loop {
        // Which incarnation of the topic this is: a new one (deleted and made again) means
        // the offsets clients hold are from another log.
        let epoch = match log.topic_epoch(FANOUT_TOPIC).await {
            Ok(epoch) => epoch,
            Err(error) => {
                if !warned {
                    tracing::warn!(%error, topic = FANOUT_TOPIC, "cannot read the shared fan-out log yet; retrying");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if store.epoch().ok() != Some(epoch) {
            let Ok(end) = log.high_watermark(FANOUT_TOPIC, 0).await else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            // Read one window back before the retained part, to know which ids it repeats.
            let from = end.saturating_sub(store.fanout_window().saturating_mul(2));
            tracing::info!(epoch, from, end, "mirroring the shared fan-out log");
            if let Err(error) = store.reset_fanout(epoch, from) {
                tracing::error!(%error, "resetting the fan-out mirror failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        warned = false;
        hub.mirroring.store(true, Ordering::Release);
        let checked = tokio::time::Instant::now();
        loop {
            let from = match store.fanout_next() {
                Ok(from) => from,
                Err(error) => {
                    tracing::error!(%error, "reading the fan-out mirror failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            match log.poll(FANOUT_TOPIC, 0, from, MIRROR_PAGE).await {
                Ok(records) if records.is_empty() => {
                    // Look at the epoch again now and then: the topic may have been reset.
                    if checked.elapsed() > Duration::from_secs(10) {
                        break;
                    }
                    tokio::select! {
                        _ = changes.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
                Ok(records) => {
                    let next = records.last().map_or(from, |r| r.offset + 1);
                    let decoded = records.iter().filter_map(decode_broadcast).collect();
                    match store.mirror_fanout(decoded, next) {
                        Ok(kept) => {
                            tracing::debug!(
                                read = records.len(),
                                kept = kept.len(),
                                next,
                                "mirrored the shared fan-out log"
                            );
                            hub.publish(kept)
                        }
                        Err(error) => {
                            tracing::error!(%error, "writing the fan-out mirror failed");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
                Err(LogError::NoSuchTopic(_) | LogError::NoSuchPartition { .. }) => break,
                Err(error) => {
                    tracing::debug!(%error, "reading the shared fan-out log failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

/// The fan-out record a record of the shared fan-out topic carries; `None` (logged) for
/// anything else.
fn decode_broadcast(record: &crate::log::Record) -> Option<FanoutRecord> {
    let envelope = match crate::envelope::Envelope::from_bytes(&record.payload) {
        Ok(envelope) if envelope.event_type == BROADCAST_TYPE => envelope,
        Ok(envelope) => {
            tracing::warn!(topic = FANOUT_TOPIC, offset = record.offset, event_type = %envelope.event_type, "skipping a record of the fan-out topic that is not a broadcast");
            return None;
        }
        Err(error) => {
            tracing::warn!(topic = FANOUT_TOPIC, offset = record.offset, %error, "skipping a record of the fan-out topic that is not an envelope");
            return None;
        }
    };
    let text = |key: &str| envelope.data.get(key).and_then(|v| v.as_str()).map(str::to_owned);
    let (Some(room), Some(plugin), Some(payload)) = (text("room"), text("plugin"), envelope.data.get("payload")) else {
        tracing::warn!(
            topic = FANOUT_TOPIC,
            offset = record.offset,
            "skipping a broadcast without room, plugin or payload"
        );
        return None;
    };
    Some(FanoutRecord {
        offset: record.offset,
        id: envelope.event_id,
        room,
        plugin,
        payload: payload.to_string(),
        at_ms: envelope.data.get("atMs").and_then(|v| v.as_u64()).unwrap_or_else(crate::envelope::now_millis),
    })
}

/// Drain a client's queue into its socket; on a close request, send the close frame (if
/// the socket takes it within a second) and stop. Frames already queued go out together,
/// with one flush (one write) for the lot rather than one per frame.
async fn write_frames(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut outgoing: mpsc::Receiver<Message>,
    mut close: oneshot::Receiver<CloseFrame>,
) {
    /// Frames written before a flush.
    const WRITE_BATCH: usize = 64;
    loop {
        let message = tokio::select! {
            biased;
            frame = &mut close => return send_close(&mut sink, frame.ok()).await,
            message = outgoing.recv() => match message {
                Some(message) => message,
                None => return,
            },
        };
        let write = async {
            sink.feed(message).await?;
            for _ in 1..WRITE_BATCH {
                match outgoing.try_recv() {
                    Ok(message) => sink.feed(message).await?,
                    Err(_) => break,
                }
            }
            sink.flush().await
        };
        tokio::select! {
            biased;
            frame = &mut close => return send_close(&mut sink, frame.ok()).await,
            written = write => if written.is_err() { return },
        }
    }
}

async fn send_close(sink: &mut futures_util::stream::SplitSink<WebSocket, Message>, frame: Option<CloseFrame>) {
    if let Some(frame) = frame {
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(Some(frame)))).await;
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
