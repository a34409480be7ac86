//! The `/ws` transport: one WebSocket client. Frames go through a queue bounded in frames
//! and in bytes to a writer of their own, so a client that does not read is cut off with a
//! reason instead of holding anything up.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::catch_up::{CatchUp, Item};
use super::{ClientSlot, Hub, Live, ROOM_ALL, Resume};
use crate::auth::Grant;
use crate::presence::Connection;

/// A ping this often; a client silent for three of these is gone.
const KEEP_ALIVE: Duration = Duration::from_secs(20);
/// How long one frame may wait for a client that is catching up before it counts as dead.
const CATCH_UP_STALL: Duration = Duration::from_secs(30);
/// Frames written before a flush.
const WRITE_BATCH: usize = 64;

/// Why a client's connection ends.
enum Ending {
    Gone,
    TooSlow(Option<u64>),
    Silent,
    /// The token it connected with expired.
    Expired,
}

/// The bytes of the text frames in one client's queue: added when queued, taken off by its
/// writer once written.
#[derive(Clone, Default)]
struct QueuedBytes(Arc<AtomicUsize>);

impl QueuedBytes {
    fn add(&self, message: &Message) {
        self.0.fetch_add(text_len(message), Ordering::AcqRel);
    }

    fn written(&self, bytes: usize) {
        self.0.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Whether `message` fits under `max` (always, into an empty queue: one frame larger
    /// than the limit still goes out).
    fn fits(&self, message: &Message, max: usize) -> bool {
        let queued = self.0.load(Ordering::Acquire);
        queued == 0 || queued + text_len(message) <= max
    }
}

fn text_len(message: &Message) -> usize {
    match message {
        Message::Text(text) => text.len(),
        _ => 0,
    }
}

/// One client's side of the hub: its rooms and its queue.
struct Client<'a> {
    queue: &'a mpsc::Sender<Message>,
    bytes: QueuedBytes,
    max_bytes: usize,
    rooms: HashSet<String>,
    max_rooms: usize,
    grant: Grant,
    /// What presence is told of its rooms.
    presence: &'a Connection,
    /// Everything up to here has been delivered (or was not for this client).
    sent: Option<u64>,
}

impl Hub {
    /// Serve one WebSocket client in `rooms` (plus `all`), resuming as `since` asks; `slot`
    /// is its place among `max_clients`, held while it is connected.
    pub async fn serve(
        self,
        socket: WebSocket,
        (grant, presence): (Grant, Connection),
        rooms: Vec<String>,
        since: Resume,
        slot: ClientSlot,
    ) {
        let _slot = slot;
        let (sink, mut incoming) = socket.split();
        let (queue, outgoing) = mpsc::channel::<Message>(self.limits.queue.max(1));
        let (close_tx, close_rx) = oneshot::channel::<CloseFrame>();
        let bytes = QueuedBytes::default();
        let writer = tokio::spawn(write_frames(sink, outgoing, close_rx, bytes.clone()));
        let mut rooms: HashSet<String> = rooms.into_iter().filter(|r| !r.is_empty()).collect();
        rooms.insert(ROOM_ALL.to_owned());
        // `presence` says `user.disconnected` when dropped, as the client goes.
        let mut client = Client {
            queue: &queue,
            bytes,
            max_bytes: self.limits.queue_bytes,
            rooms,
            max_rooms: self.limits.max_rooms,
            grant,
            presence: &presence,
            sent: None,
        };
        let close = match self.client_loop(&mut client, &mut incoming, since).await {
            Ending::Gone => None,
            Ending::TooSlow(sent) => {
                let resume = sent.map_or(String::new(), |s| format!(" since={s}"));
                tracing::info!(last_offset = ?sent, "disconnecting a WebSocket client that fell too far behind");
                crate::metrics::metrics().slow_clients_cut.with_label_values(&["websocket"]).inc();
                Some(CloseFrame { code: 4008, reason: Utf8Bytes::from(format!("too slow: reconnect with{resume}")) })
            }
            Ending::Silent => Some(CloseFrame { code: 4000, reason: Utf8Bytes::from("no answer to pings") }),
            Ending::Expired => Some(CloseFrame { code: 4001, reason: Utf8Bytes::from("token expired") }),
        };
        if let Some(frame) = close {
            let _ = close_tx.send(frame);
        }
        drop(queue);
        let _ = writer.await;
    }

    async fn client_loop(
        &self,
        client: &mut Client<'_>,
        incoming: &mut SplitStream<WebSocket>,
        resume: Resume,
    ) -> Ending {
        let (live, start) = self.start(resume).await;
        let welcome = start.welcome(&sorted(&client.rooms));
        if let Err(ending) = client.try_queue(Message::Text(welcome.to_string().into())) {
            return ending;
        }
        if let Some(notice) = &start.reset
            && let Err(ending) = client.try_queue(Message::Text(notice.to_string().into()))
        {
            return ending;
        }
        if let Some(after) = start.after
            && let Err(ending) = self.catch_up(client, after).await
        {
            return ending;
        }
        client.pump(live, incoming).await
    }

    /// Queue the stored records after `since` (`None`: from offset zero) for the client's
    /// rooms, waiting (up to a limit) for a slow reader rather than dropping anything.
    async fn catch_up(&self, client: &mut Client<'_>, since: Option<u64>) -> Result<(), Ending> {
        let mut pages = CatchUp::new(since);
        let (queue, bytes, max_bytes) = (client.queue, &client.bytes, client.max_bytes);
        let send = |text: String| async move {
            let message = Message::Text(text.into());
            let waiting = async {
                // Room in bytes first (the writer frees it as it writes), then in frames.
                while !bytes.fits(&message, max_bytes) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                bytes.add(&message);
                queue.send(message).await
            };
            match tokio::time::timeout(CATCH_UP_STALL, waiting).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(Ending::Gone),
                Err(_) => Err(Ending::TooSlow(since)),
            }
        };
        let rooms = &client.rooms;
        while let Some(page) = pages.next_page_blocking(self.store(), rooms.clone()).await.map_err(|_| Ending::Gone)? {
            for item in page {
                send(match item {
                    Item::Notice(notice) => notice.to_string(),
                    Item::Record(record) => Hub::frame(&record),
                })
                .await?;
            }
        }
        client.sent = pages.covered();
        Ok(())
    }
}

impl Client<'_> {
    /// Live records, the client's messages and keep-alive pings, until the client goes.
    async fn pump(
        &mut self,
        mut live: broadcast::Receiver<Arc<Live>>,
        incoming: &mut SplitStream<WebSocket>,
    ) -> Ending {
        let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
        let mut heard = tokio::time::Instant::now();
        // A socket lives no longer than its token (never, for one without `exp`).
        let expiry = match self.grant.time_left() {
            Some(left) => tokio::time::sleep(left),
            None => tokio::time::sleep(Duration::from_secs(u64::from(u32::MAX))),
        };
        tokio::pin!(expiry);
        loop {
            let step = tokio::select! {
                _ = &mut expiry => Err(Ending::Expired),
                record = live.recv() => match record {
                    Ok(record) => self.deliver(&record),
                    Err(broadcast::error::RecvError::Lagged(_)) => Err(Ending::TooSlow(self.sent)),
                    Err(broadcast::error::RecvError::Closed) => Err(Ending::Gone),
                },
                message = incoming.next() => {
                    heard = tokio::time::Instant::now();
                    match message {
                        Some(Ok(Message::Text(text))) => {
                            let reply = handle_client_message(self, text.as_str());
                            self.presence.rooms_now(&self.rooms);
                            self.try_queue(Message::Text(reply.into()))
                        }
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Err(Ending::Gone),
                        Some(Ok(_)) => Ok(()),
                    }
                }
                _ = keep_alive.tick() => {
                    if heard.elapsed() > KEEP_ALIVE * 3 {
                        Err(Ending::Silent)
                    } else {
                        self.try_queue(Message::Ping(Default::default()))
                    }
                }
            };
            if let Err(ending) = step {
                return ending;
            }
        }
    }

    /// Queue a live record if it is new to the client and in one of its rooms.
    fn deliver(&mut self, live: &Live) -> Result<(), Ending> {
        let record = &live.record;
        if self.sent.is_some_and(|s| record.offset <= s) {
            return Ok(());
        }
        if self.rooms.contains(&record.room) {
            self.try_queue(Message::Text(live.frame.clone()))?;
        }
        self.sent = Some(record.offset);
        Ok(())
    }

    /// Queue `message` now, or end the client: too slow if its queue is full in frames or
    /// in bytes.
    fn try_queue(&self, message: Message) -> Result<(), Ending> {
        if !self.bytes.fits(&message, self.max_bytes) {
            return Err(Ending::TooSlow(self.sent));
        }
        self.bytes.add(&message);
        match self.queue.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(message)) => {
                self.bytes.written(text_len(&message));
                Err(Ending::TooSlow(self.sent))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Ending::Gone),
        }
    }
}

/// Drain a client's queue into its socket; on a close request, send the close frame (if
/// the socket takes it within a second) and stop. Frames already queued go out together,
/// with one flush (one write) for the lot rather than one per frame.
async fn write_frames(
    mut sink: SplitSink<WebSocket, Message>,
    mut outgoing: mpsc::Receiver<Message>,
    mut close: oneshot::Receiver<CloseFrame>,
    bytes: QueuedBytes,
) {
    loop {
        let message = tokio::select! {
            biased;
            frame = &mut close => return send_close(&mut sink, frame.ok()).await,
            message = outgoing.recv() => match message {
                Some(message) => message,
                None => return,
            },
        };
        // Bytes count as queued until flushed: a writer stuck on a client that does not
        // read holds them, and the client's limit sees them.
        let write = async {
            let mut fed = vec![text_len(&message)];
            sink.feed(message).await?;
            for _ in 1..WRITE_BATCH {
                match outgoing.try_recv() {
                    Ok(message) => {
                        fed.push(text_len(&message));
                        sink.feed(message).await?
                    }
                    Err(_) => break,
                }
            }
            sink.flush().await?;
            bytes.written(fed.iter().sum());
            crate::metrics::metrics().frames("websocket", fed.len());
            Ok::<(), axum::Error>(())
        };
        tokio::select! {
            biased;
            frame = &mut close => return send_close(&mut sink, frame.ok()).await,
            written = write => if written.is_err() { return },
        }
    }
}

async fn send_close(sink: &mut SplitSink<WebSocket, Message>, frame: Option<CloseFrame>) {
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
fn handle_client_message(client: &mut Client<'_>, text: &str) -> String {
    let Client { rooms, grant, max_rooms, presence, .. } = client;
    let max_rooms = *max_rooms;
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
        let new: HashSet<String> = wanted.into_iter().filter(|r| !r.is_empty() && !rooms.contains(r)).collect();
        // `all` does not count.
        if rooms.len() - 1 + new.len() > max_rooms {
            return serde_json::json!({"type": "error", "error": format!("at most {max_rooms} rooms per client")})
                .to_string();
        }
        if let Err(e) = presence.permit(new.len()) {
            return serde_json::json!({"type": "error", "error": e.to_string()}).to_string();
        }
        rooms.extend(new);
    } else if message.contains_key("unsubscribe") {
        let leaving: HashSet<String> =
            names("unsubscribe").into_iter().filter(|r| r != ROOM_ALL && rooms.contains(r)).collect();
        if let Err(e) = presence.permit(leaving.len()) {
            return serde_json::json!({"type": "error", "error": e.to_string()}).to_string();
        }
        for room in leaving {
            rooms.remove(&room);
        }
    } else if message.contains_key("ping") {
        return serde_json::json!({"type": "pong"}).to_string();
    } else {
        return serde_json::json!({"type": "error", "error": "unknown message; use subscribe or unsubscribe"})
            .to_string();
    }
    serde_json::json!({"type": "rooms", "rooms": sorted(rooms)}).to_string()
}
