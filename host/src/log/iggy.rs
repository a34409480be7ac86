//! The Apache Iggy backend: the same `EventLog` contract on an Iggy server over TCP.
//!
//! Every accepted publish is first written to a durable local spool (group commit, with
//! deduplication by `eventId` over a window), and a forwarder sends the spool to Iggy in
//! order, removing what Iggy acknowledged. So `POST /api/events` keeps answering while Iggy
//! is down, and nothing accepted is lost: it is forwarded when Iggy is back. A resend after
//! a lost acknowledgement can put an event in Iggy twice; runners skip an `eventId` they
//! have already applied.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use iggy::prelude::{
    Client, CompressionAlgorithm, Consumer, ConsumerOffsetClient, Identifier, IggyClient, IggyError, IggyExpiry,
    IggyMessage, MaxTopicSize, MessageClient, Partitioning, PollingStrategy, StreamClient, TopicClient, UserClient,
};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot, watch};

use super::{AppendItem, Appended, EventLog, LogError, Record, partition_for};
use crate::topics::FANOUT as FANOUT_TOPIC;

/// spool sequence → SpoolEntry JSON, in acceptance order
const SPOOL: TableDefinition<u64, &[u8]> = TableDefinition::new("spool");
/// eventId → (topic, partition, sequence) for the deduplication window
const IDS: TableDefinition<u128, (&str, u32, u64)> = TableDefinition::new("ids");
/// sequence → eventId, to drop the oldest ids past the window
const IDS_BY_SEQ: TableDefinition<u64, u128> = TableDefinition::new("ids_by_seq");
/// "next" → next sequence
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// spool sequence → SpoolEntry JSON: the last `RESEND_AFTER_LOSS` entries Iggy acknowledged
const RECENT: TableDefinition<u64, &[u8]> = TableDefinition::new("recent");

/// Spool entries sent per round. A crash between Iggy's acknowledgement and the spool's
/// cleanup resends at most this many per partition; runners remember at least as many ids
/// per partition (`SEEN_PRIME`), so the copies are recognised.
pub const FORWARD_BATCH: usize = 512;

/// Acknowledged entries sent again after the connection to Iggy was lost. Iggy 0.8.0 was
/// seen (kill -9 with every batch fsynced) to come back with the last message written
/// before the crash unreadable although it had acknowledged it; a copy sent again is read
/// instead, and runners skip the copies of what they already applied.
const RESEND_AFTER_LOSS: u64 = FORWARD_BATCH as u64;

/// How long one request to Iggy may take. The client reconnects forever in the background,
/// so a request made while the server is down would otherwise wait until it is back, and
/// anything waiting on it (a status page, a replay, a runner) would hang with it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections the forwarder sends over (see `IggyLog::senders`).
const SEND_CONNECTIONS: usize = 4;

/// `request`, or `Unavailable` if Iggy does not answer within `REQUEST_TIMEOUT`.
async fn answered<T>(request: impl std::future::Future<Output = Result<T, IggyError>>) -> Result<T, LogError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(LogError::Unavailable(format!("Iggy did not answer within {} s", REQUEST_TIMEOUT.as_secs()))),
    }
}

/// How the host reaches Iggy.
#[derive(Debug, Clone)]
pub struct IggySettings {
    /// `host:port` of the server's TCP transport.
    pub address: String,
    pub username: String,
    pub password: String,
    pub stream: String,
    /// Partitions of each topic Owlery creates.
    pub partitions: u32,
    /// Recent `eventId`s remembered for deduplicating publishes.
    pub dedup_window: u64,
}

impl Default for IggySettings {
    fn default() -> Self {
        IggySettings {
            address: "127.0.0.1:8090".into(),
            username: "iggy".into(),
            password: "iggy".into(),
            stream: "owlery".into(),
            partitions: 8,
            dedup_window: 100_000,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SpoolEntry {
    topic: String,
    partition: u32,
    event_id: u128,
    payload: String,
}

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Health {
    connected: bool,
    last_error: Option<String>,
    last_error_at: Option<String>,
    forwarded: u64,
    /// Times the connection was lost (connected, then an error).
    #[serde(skip)]
    losses: u64,
}

/// Why one poll request failed.
enum PollError {
    /// Iggy's InvalidOffset: past the end, or (see `poll`) a count it cannot serve.
    InvalidOffset,
    Log(LogError),
}

impl From<LogError> for PollError {
    fn from(e: LogError) -> Self {
        PollError::Log(e)
    }
}

/// What is known of where each partition ends, so that a poll of a partition with nothing
/// new is answered without asking Iggy (a runner polls every partition of its topics each
/// time anything changes; on one connection those requests queue behind each other).
#[derive(Default)]
struct Ends {
    /// (topic, partition) → (end as last read from Iggy if still known, generation)
    known: HashMap<(String, u32), (Option<u64>, u64)>,
}

impl Ends {
    /// Something was sent to the partition: its end is unknown until read again.
    fn sent(&mut self, topic: &str, partition: u32) {
        let entry = self.known.entry((topic.to_owned(), partition)).or_insert((None, 0));
        *entry = (None, entry.1 + 1);
    }

    fn generation(&self, topic: &str, partition: u32) -> u64 {
        self.known.get(&(topic.to_owned(), partition)).map_or(0, |e| e.1)
    }

    /// Record an end read from Iggy, unless the partition was sent to since `generation`.
    /// Returns whether it moved.
    fn read(&mut self, topic: &str, partition: u32, end: u64, generation: u64) -> bool {
        let entry = self.known.entry((topic.to_owned(), partition)).or_insert((None, 0));
        if entry.1 != generation {
            return false;
        }
        let moved = entry.0 != Some(end);
        entry.0 = Some(end);
        moved
    }

    /// True when the partition is known to end at or before `from`.
    fn nothing_from(&self, topic: &str, partition: u32, from: u64) -> bool {
        // Looking up by a borrowed pair would need another key type; this is a small map.
        self.known.iter().any(|((t, p), (end, _))| *p == partition && t == topic && end.is_some_and(|e| e <= from))
    }
}

type Reply = oneshot::Sender<Result<Vec<Appended>, LogError>>;
/// (consumer, topic, partition) → next offset
type ConsumerOffsets = HashMap<(String, String, u32), u64>;
/// Spool entries of one (topic, partition), in order.
type PartitionGroup = ((String, u32), Vec<(u64, SpoolEntry)>);

pub struct IggyLog {
    /// Writes: the forwarder's sends, topic creation, consumer offsets.
    client: Arc<IggyClient>,
    /// Reads, on a connection of their own, so that they do not queue behind sends that
    /// wait for Iggy's fsync.
    reader: Arc<IggyClient>,
    /// More connections for the forwarder's sends: each waits for its partition's fsync, so
    /// sends to different partitions go over different connections at once.
    senders: Vec<Arc<IggyClient>>,
    settings: IggySettings,
    stream: Identifier,
    spool: Arc<Database>,
    writer: Option<mpsc::Sender<(Vec<AppendItem>, Reply)>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    changes_tx: watch::Sender<u64>,
    changes: watch::Receiver<u64>,
    health: Arc<Mutex<Health>>,
    /// topic → partitions, as created or as found on the server
    topics: Arc<Mutex<BTreeMap<String, u32>>>,
    ends: Arc<Mutex<Ends>>,
    forward: Arc<Notify>,
    /// (consumer, topic, partition) → next offset, stored in Iggy in the background
    consumer_offsets: Arc<Mutex<ConsumerOffsets>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn storage(e: impl Into<redb::Error>) -> LogError {
    LogError::Storage(e.into().to_string())
}

fn unavailable(e: IggyError) -> LogError {
    LogError::Unavailable(e.to_string())
}

/// Connect `client` (a no-op when it is), and sign in again: the client's own reconnect
/// after a server restart was seen to leave a connection up but signed out (every request
/// then answered Unauthenticated).
async fn connect_signed_in(client: &IggyClient, settings: &IggySettings) -> Result<(), String> {
    client.connect().await.map_err(|e| format!("connecting: {e}"))?;
    answered(client.login_user(&settings.username, &settings.password))
        .await
        .map(drop)
        .map_err(|e| format!("signing in as {}: {e}", settings.username))
}

/// Partitions of a topic Owlery creates: the shared fan-out log has one (one order).
fn partitions_of(settings: &IggySettings, topic: &str) -> u32 {
    if topic == FANOUT_TOPIC { 1 } else { settings.partitions }
}

fn ident(name: &str) -> Result<Identifier, LogError> {
    Identifier::named(name).map_err(|e| LogError::Storage(format!("{name:?}: {e}")))
}

impl IggyLog {
    /// Open the spool in `dir` and start connecting to Iggy in the background; the host
    /// starts (and accepts publishes) whether or not Iggy is up.
    pub fn open(dir: &Path, settings: IggySettings) -> Result<IggyLog, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| LogError::Storage(format!("{}: {e}", dir.display())))?;
        let spool = Arc::new(open_spool(&dir.join("spool.redb"))?);
        {
            let txn = spool.begin_write().map_err(storage)?;
            txn.open_table(SPOOL).map_err(storage)?;
            txn.open_table(IDS).map_err(storage)?;
            txn.open_table(IDS_BY_SEQ).map_err(storage)?;
            txn.open_table(META).map_err(storage)?;
            txn.open_table(RECENT).map_err(storage)?;
            txn.commit().map_err(storage)?;
        }
        let url = format!(
            "iggy://{}:{}@{}?nodelay=true&reconnection_retries=unlimited&reconnection_interval=1s",
            settings.username, settings.password, settings.address
        );
        let client = Arc::new(
            IggyClient::from_connection_string(&url)
                .map_err(|e| LogError::Storage(format!("Iggy connection settings: {e}")))?,
        );
        let reader = Arc::new(
            IggyClient::from_connection_string(&url)
                .map_err(|e| LogError::Storage(format!("Iggy connection settings: {e}")))?,
        );
        let mut senders = vec![client.clone()];
        for _ in 1..SEND_CONNECTIONS {
            senders.push(Arc::new(
                IggyClient::from_connection_string(&url)
                    .map_err(|e| LogError::Storage(format!("Iggy connection settings: {e}")))?,
            ));
        }
        let stream = ident(&settings.stream)?;
        let (changes_tx, changes) = watch::channel(0);
        let topics: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
        let forward = Arc::new(Notify::new());
        let (tx, rx) = mpsc::channel();
        let writer_thread = {
            let (spool, topics, forward, settings) = (spool.clone(), topics.clone(), forward.clone(), settings.clone());
            std::thread::Builder::new()
                .name("owlery-spool-writer".into())
                .spawn(move || spool_writer(&spool, &rx, &topics, &forward, &settings))
                .map_err(|e| LogError::Storage(e.to_string()))?
        };
        let mut log = IggyLog {
            client,
            reader,
            senders,
            settings,
            stream,
            spool,
            writer: Some(tx),
            writer_thread: Some(writer_thread),
            changes_tx,
            changes,
            health: Arc::default(),
            topics,
            forward,
            consumer_offsets: Arc::default(),
            ends: Arc::default(),
            tasks: Vec::new(),
        };
        log.tasks.push(tokio::spawn(log.forwarder()));
        log.tasks.push(tokio::spawn(log.tailer()));
        log.tasks.push(tokio::spawn(log.offset_recorder()));
        Ok(log)
    }

    fn note_error(health: &Mutex<Health>, error: &str) {
        let mut h = health.lock().expect("health lock");
        if h.connected || h.last_error.as_deref() != Some(error) {
            tracing::warn!(%error, "Iggy");
        }
        if h.connected {
            h.losses += 1;
        }
        h.connected = false;
        h.last_error = Some(error.to_owned());
        h.last_error_at = Some(crate::envelope::now_rfc3339());
    }

    fn spool_depth(&self) -> u64 {
        let Ok(txn) = self.spool.begin_read() else { return 0 };
        txn.open_table(SPOOL).ok().and_then(|t| t.len().ok()).unwrap_or(0)
    }

    fn remote(&self) -> Remote {
        Remote {
            settings: self.settings.clone(),
            client: self.client.clone(),
            reader: self.reader.clone(),
            senders: self.senders.clone(),
            stream: self.stream.clone(),
            stream_name: self.settings.stream.clone(),
            partitions: self.settings.partitions,
            topics: self.topics.clone(),
            health: self.health.clone(),
            ends: self.ends.clone(),
        }
    }

    /// Sends the spool to Iggy, in order, forever.
    fn forwarder(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let remote = self.remote();
        let (spool, wake, changes) = (self.spool.clone(), self.forward.clone(), self.changes_tx.clone());
        async move {
            let mut backoff = Duration::from_millis(100);
            let mut ready = false;
            // Connection losses whose recently acknowledged entries were sent again.
            let mut resent_for = 0;
            loop {
                if !ready {
                    match remote.prepare().await {
                        Ok(()) => {
                            ready = true;
                            backoff = Duration::from_millis(100);
                            changes.send_modify(|n| *n += 1);
                        }
                        Err(e) => {
                            IggyLog::note_error(&remote.health, &e);
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                            continue;
                        }
                    }
                }
                let losses = remote.health.lock().expect("health lock").losses;
                if losses != resent_for {
                    let recent = match recent_entries(&spool) {
                        Ok(recent) => recent,
                        Err(e) => {
                            tracing::error!(error = %e, "reading the spool failed");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    if !recent.is_empty() {
                        tracing::info!(
                            entries = recent.len(),
                            "the connection to Iggy was lost: sending the last acknowledged events again \
                             (a crashed Iggy can come back without the last one it acknowledged)"
                        );
                    }
                    match remote.send(&spool, recent, false).await {
                        Ok(()) => resent_for = losses,
                        Err(e) => {
                            IggyLog::note_error(&remote.health, &e);
                            ready = false;
                            tokio::time::sleep(backoff).await;
                            continue;
                        }
                    }
                }
                let entries = match peek_spool(&spool, FORWARD_BATCH) {
                    Ok(entries) => entries,
                    Err(e) => {
                        tracing::error!(error = %e, "reading the spool failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if entries.is_empty() {
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
                match remote.send(&spool, entries, true).await {
                    Ok(()) => changes.send_modify(|n| *n += 1),
                    Err(e) => {
                        IggyLog::note_error(&remote.health, &e);
                        ready = false;
                        tokio::time::sleep(backoff).await;
                    }
                }
            }
        }
    }

    /// Notices messages written by other Iggy clients and wakes the readers; also keeps
    /// the connection state honest (a request stuck in the client's reconnect loop counts
    /// as down).
    fn tailer(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (client, stream, changes, health) =
            (self.reader.clone(), self.stream.clone(), self.changes_tx.clone(), self.health.clone());
        let (ends, settings) = (self.ends.clone(), self.settings.clone());
        async move {
            // topic → messages it held at the last look
            let mut counts: HashMap<String, u64> = HashMap::new();
            let mut tick: u64 = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                tick += 1;
                let details = match tokio::time::timeout(Duration::from_secs(1), client.get_stream(&stream)).await {
                    Ok(Ok(Some(details))) => details,
                    // The stream is not created yet: the forwarder is on it.
                    Ok(Ok(None)) => continue,
                    Ok(Err(e)) => {
                        IggyLog::note_error(&health, &e.to_string());
                        if matches!(e, IggyError::Unauthenticated) {
                            let _ = connect_signed_in(&client, &settings).await;
                        }
                        continue;
                    }
                    Err(_) => {
                        IggyLog::note_error(&health, "Iggy did not answer within 1 s");
                        continue;
                    }
                };
                health.lock().expect("health lock").connected = true;
                let mut moved = false;
                for topic in details.topics {
                    // Where its partitions end: read when it changed, and every second anyway.
                    if counts.get(&topic.name) == Some(&topic.messages_count) && !tick.is_multiple_of(20) {
                        continue;
                    }
                    moved |= counts.insert(topic.name.clone(), topic.messages_count) != Some(topic.messages_count);
                    let Ok(id) = Identifier::named(&topic.name) else { continue };
                    let generations: Vec<u64> = {
                        let ends = ends.lock().expect("ends lock");
                        (0..topic.partitions_count).map(|p| ends.generation(&topic.name, p)).collect()
                    };
                    let Ok(Ok(Some(topic_details))) =
                        tokio::time::timeout(Duration::from_secs(1), client.get_topic(&stream, &id)).await
                    else {
                        continue;
                    };
                    let mut ends = ends.lock().expect("ends lock");
                    for partition in &topic_details.partitions {
                        let end = if partition.messages_count == 0 { 0 } else { partition.current_offset + 1 };
                        let generation = generations.get(partition.id as usize).copied().unwrap_or(0);
                        moved |= ends.read(&topic.name, partition.id, end, generation);
                    }
                }
                if moved {
                    changes.send_modify(|n| *n += 1);
                }
            }
        }
    }

    /// Stores each plugin's offsets in Iggy (consumer `owlery-{plugin}`) so Iggy's own
    /// tools show its lag. Owlery's store stays the source of truth.
    fn offset_recorder(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (client, stream, pending) = (self.client.clone(), self.stream.clone(), self.consumer_offsets.clone());
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let batch: Vec<_> = std::mem::take(&mut *pending.lock().expect("offsets lock")).into_iter().collect();
                for ((consumer, topic, partition), next) in batch {
                    let (Ok(consumer_id), Ok(topic_id)) = (Identifier::named(&consumer), Identifier::named(&topic))
                    else {
                        continue;
                    };
                    // Iggy stores the last consumed offset.
                    let Some(last) = next.checked_sub(1) else { continue };
                    let consumer_id = Consumer::new(consumer_id);
                    let request = client.store_consumer_offset(&consumer_id, &stream, &topic_id, Some(partition), last);
                    if let Err(error) = answered(request).await {
                        tracing::debug!(%consumer, %topic, partition, %error, "storing a consumer offset in Iggy failed");
                    }
                }
            }
        }
    }

    /// One poll request of `count` messages from `from`.
    async fn poll_once(&self, topic: &str, partition: u32, from: u64, count: u32) -> Result<Vec<Record>, PollError> {
        self.need_connection()?;
        let consumer = Consumer::new(ident("owlery")?);
        let topic_id = ident(topic)?;
        let strategy = PollingStrategy::offset(from);
        let request =
            self.reader.poll_messages(&self.stream, &topic_id, Some(partition), &consumer, &strategy, count, false);
        let Ok(polled) = tokio::time::timeout(REQUEST_TIMEOUT, request).await else {
            let waited = REQUEST_TIMEOUT.as_secs();
            return Err(LogError::Unavailable(format!("Iggy did not answer within {waited} s")).into());
        };
        let polled = match polled {
            Ok(polled) => polled,
            Err(IggyError::TopicIdNotFound(..) | IggyError::TopicNameNotFound(..)) => {
                return Err(LogError::NoSuchTopic(topic.to_owned()).into());
            }
            // Right after a topic is made, another connection (another of Iggy's shards) can
            // briefly not know its partitions yet: that is a wait, not an answer.
            Err(IggyError::PartitionNotFound(..))
                if partition
                    < self
                        .topics
                        .lock()
                        .expect("topics lock")
                        .get(topic)
                        .copied()
                        .unwrap_or_else(|| partitions_of(&self.settings, topic)) =>
            {
                return Err(LogError::Unavailable(format!("Iggy does not show {topic}/{partition} yet")).into());
            }
            Err(IggyError::PartitionNotFound(..)) => {
                return Err(LogError::NoSuchPartition { topic: topic.to_owned(), partition }.into());
            }
            Err(IggyError::InvalidOffset(_)) => return Err(PollError::InvalidOffset),
            Err(e) => return Err(unavailable(e).into()),
        };
        Ok(polled
            .messages
            .into_iter()
            .filter(|m| m.header.offset >= from)
            .map(|m| Record { partition, offset: m.header.offset, payload: m.payload.to_vec() })
            .collect())
    }

    /// Fail fast while Iggy is known to be down: every request made then would sit in the
    /// client's own reconnect loop, and many of them at once (one per runner and partition)
    /// race each other's reconnects; the forwarder and the health probe reconnect.
    fn need_connection(&self) -> Result<(), LogError> {
        let health = self.health.lock().expect("health lock");
        if health.connected {
            return Ok(());
        }
        Err(LogError::Unavailable(health.last_error.clone().unwrap_or_else(|| "not connected to Iggy yet".into())))
    }

    async fn topic_details(&self, topic: &str) -> Result<iggy::prelude::TopicDetails, LogError> {
        self.need_connection()?;
        answered(self.reader.get_topic(&self.stream, &ident(topic)?))
            .await?
            .ok_or_else(|| LogError::NoSuchTopic(topic.to_owned()))
    }
}

impl Drop for IggyLog {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        drop(self.writer.take());
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }
}

/// The parts of the log the forwarder needs.
struct Remote {
    settings: IggySettings,
    client: Arc<IggyClient>,
    reader: Arc<IggyClient>,
    senders: Vec<Arc<IggyClient>>,
    stream: Identifier,
    stream_name: String,
    partitions: u32,
    topics: Arc<Mutex<BTreeMap<String, u32>>>,
    health: Arc<Mutex<Health>>,
    ends: Arc<Mutex<Ends>>,
}

impl Remote {
    /// Connect, then create the stream and the known topics if missing. Idempotent, and
    /// safe when another host does the same at the same moment.
    async fn prepare(&self) -> Result<(), String> {
        connect_signed_in(&self.client, &self.settings).await?;
        connect_signed_in(&self.reader, &self.settings).await?;
        for sender in &self.senders[1..] {
            connect_signed_in(sender, &self.settings).await?;
        }
        if self.client.get_stream(&self.stream).await.map_err(|e| e.to_string())?.is_none() {
            match self.client.create_stream(&self.stream_name).await {
                Ok(_) | Err(IggyError::StreamNameAlreadyExists(_)) => {}
                Err(e) => return Err(format!("creating stream {}: {e}", self.stream_name)),
            }
        }
        let wanted: Vec<String> = self.topics.lock().expect("topics lock").keys().cloned().collect();
        for topic in wanted {
            self.ensure_topic(&topic).await?;
        }
        let mut health = self.health.lock().expect("health lock");
        if !health.connected {
            tracing::info!("connected to Iggy");
        }
        health.connected = true;
        Ok(())
    }

    async fn ensure_topic(&self, topic: &str) -> Result<(), String> {
        let id = Identifier::named(topic).map_err(|e| e.to_string())?;
        if self.client.get_topic(&self.stream, &id).await.map_err(|e| e.to_string())?.is_none() {
            let created = self
                .client
                .create_topic(
                    &self.stream,
                    topic,
                    if topic == FANOUT_TOPIC { 1 } else { self.partitions },
                    CompressionAlgorithm::None,
                    None,
                    IggyExpiry::NeverExpire,
                    MaxTopicSize::ServerDefault,
                )
                .await;
            match created {
                Ok(_) | Err(IggyError::TopicNameAlreadyExists(..)) => {}
                Err(e) => return Err(format!("creating topic {topic}: {e}")),
            }
        }
        // Ask again rather than trust the creation's answer: that is what the server holds
        // (another host may have created it first, with another partition count).
        let details = self
            .client
            .get_topic(&self.stream, &id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("topic {topic} vanished"))?;
        if details.partitions_count == 0 {
            return Err(format!("topic {topic} has no partitions"));
        }
        self.topics.lock().expect("topics lock").insert(topic.to_owned(), details.partitions_count);
        Ok(())
    }

    /// Send spool entries partition by partition, in order; with `acknowledge`, each group
    /// Iggy acknowledged leaves the spool at once.
    async fn send(&self, spool: &Database, entries: Vec<(u64, SpoolEntry)>, acknowledge: bool) -> Result<(), String> {
        let mut groups: Vec<PartitionGroup> = Vec::new();
        for (seq, entry) in entries {
            let key = (entry.topic.clone(), entry.partition);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, group)) => group.push((seq, entry)),
                None => groups.push((key, vec![(seq, entry)])),
            }
        }
        for ((topic, _), _) in &groups {
            if !self.topics.lock().expect("topics lock").contains_key(topic) {
                self.ensure_topic(topic).await?;
            }
        }
        // Partitions are independent: send to all of them at once, each in order.
        let sends = groups.into_iter().map(|((topic, partition), group)| async move {
            let mut messages = Vec::with_capacity(group.len());
            for (_, entry) in &group {
                let message = IggyMessage::builder()
                    .id(entry.event_id)
                    .payload(Bytes::from(entry.payload.clone()))
                    .build()
                    .map_err(|e| e.to_string())?;
                messages.push(message);
            }
            let topic_id = Identifier::named(&topic).map_err(|e| e.to_string())?;
            let started = std::time::Instant::now();
            // Not acknowledged in time counts as not sent: it stays in the spool and is sent
            // again (a copy that did arrive is skipped by the runners, by its eventId).
            let sender =
                &self.senders[partition_for(&format!("{topic}/{partition}"), self.senders.len() as u32) as usize];
            answered(sender.send_messages(
                &self.stream,
                &topic_id,
                &Partitioning::partition_id(partition),
                &mut messages,
            ))
            .await
            .map_err(|e| format!("sending to {topic}/{partition}: {e}"))?;
            tracing::debug!(%topic, partition, messages = group.len(), took = ?started.elapsed(), "sent to Iggy");
            self.ends.lock().expect("ends lock").sent(&topic, partition);
            Ok::<Vec<u64>, String>(group.iter().map(|(seq, _)| *seq).collect())
        });
        let mut first_error = None;
        for result in futures_util::future::join_all(sends).await {
            match result {
                Ok(seqs) => {
                    let mut health = if acknowledge {
                        remove_from_spool(spool, &seqs).map_err(|e| e.to_string())?;
                        let mut health = self.health.lock().expect("health lock");
                        health.forwarded += seqs.len() as u64;
                        health
                    } else {
                        self.health.lock().expect("health lock")
                    };
                    health.connected = true;
                }
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Open the spool; a previous `IggyLog` of this directory may still be letting go of it
/// (its background tasks end a moment after it is dropped).
fn open_spool(path: &Path) -> Result<Database, LogError> {
    let mut tries = 0;
    loop {
        match Database::create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if tries < 250 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.map_err(storage),
        }
    }
}

fn peek_spool(spool: &Database, max: usize) -> Result<Vec<(u64, SpoolEntry)>, LogError> {
    let txn = spool.begin_read().map_err(storage)?;
    let table = txn.open_table(SPOOL).map_err(storage)?;
    let mut out = Vec::new();
    for entry in table.iter().map_err(storage)?.take(max) {
        let (seq, value) = entry.map_err(storage)?;
        let parsed: SpoolEntry = serde_json::from_slice(value.value()).map_err(|e| LogError::Storage(e.to_string()))?;
        out.push((seq.value(), parsed));
    }
    Ok(out)
}

/// Iggy acknowledged these: out of the spool, into the recently forwarded entries.
fn remove_from_spool(spool: &Database, seqs: &[u64]) -> Result<(), LogError> {
    let txn = spool.begin_write().map_err(storage)?;
    {
        let mut table = txn.open_table(SPOOL).map_err(storage)?;
        let mut recent = txn.open_table(RECENT).map_err(storage)?;
        for seq in seqs {
            if let Some(value) = table.remove(*seq).map_err(storage)? {
                recent.insert(*seq, value.value()).map_err(storage)?;
            }
        }
        let kept = recent.len().map_err(storage)?;
        if kept > RESEND_AFTER_LOSS {
            let old: Vec<u64> = recent
                .iter()
                .map_err(storage)?
                .take((kept - RESEND_AFTER_LOSS) as usize)
                .map_while(|e| e.ok().map(|(k, _)| k.value()))
                .collect();
            for seq in old {
                recent.remove(seq).map_err(storage)?;
            }
        }
    }
    txn.commit().map_err(storage)
}

/// The recently forwarded entries (see `RESEND_AFTER_LOSS`), in order.
fn recent_entries(spool: &Database) -> Result<Vec<(u64, SpoolEntry)>, LogError> {
    let txn = spool.begin_read().map_err(storage)?;
    let table = txn.open_table(RECENT).map_err(storage)?;
    let mut out = Vec::new();
    for entry in table.iter().map_err(storage)? {
        let (seq, value) = entry.map_err(storage)?;
        let parsed: SpoolEntry = serde_json::from_slice(value.value()).map_err(|e| LogError::Storage(e.to_string()))?;
        out.push((seq.value(), parsed));
    }
    Ok(out)
}

fn spool_writer(
    spool: &Database,
    requests: &mpsc::Receiver<(Vec<AppendItem>, Reply)>,
    topics: &Mutex<BTreeMap<String, u32>>,
    forward: &Notify,
    settings: &IggySettings,
) {
    while let Ok(first) = requests.recv() {
        let mut group = vec![first];
        while group.len() < 1024 {
            match requests.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        match accept(spool, &group, topics, settings) {
            Ok(results) => {
                forward.notify_one();
                for ((_, reply), result) in group.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "spooling failed; nothing of these requests was accepted");
                for (_, reply) in group {
                    let _ = reply.send(Err(LogError::Storage(e.to_string())));
                }
            }
        }
    }
}

/// One durable transaction for a group of publish requests: dedup, spool, window upkeep.
fn accept(
    spool: &Database,
    group: &[(Vec<AppendItem>, Reply)],
    topics: &Mutex<BTreeMap<String, u32>>,
    settings: &IggySettings,
) -> Result<Vec<Vec<Appended>>, LogError> {
    let txn = spool.begin_write().map_err(storage)?;
    let mut results = Vec::with_capacity(group.len());
    {
        let mut table = txn.open_table(SPOOL).map_err(storage)?;
        let mut ids = txn.open_table(IDS).map_err(storage)?;
        let mut by_seq = txn.open_table(IDS_BY_SEQ).map_err(storage)?;
        let mut meta = txn.open_table(META).map_err(storage)?;
        let mut next = meta.get("next").map_err(storage)?.map_or(0, |v| v.value());
        for (items, _) in group {
            let mut appended = Vec::with_capacity(items.len());
            for item in items {
                let id = item.envelope.event_id.as_u128();
                if let Some(first) = ids.get(id).map_err(storage)? {
                    let (topic, partition, _) = first.value();
                    appended.push(Appended {
                        event_id: item.envelope.event_id,
                        topic: topic.to_owned(),
                        partition,
                        offset: None,
                        duplicate: true,
                    });
                    continue;
                }
                let partitions = *topics
                    .lock()
                    .expect("topics lock")
                    .entry(item.topic.clone())
                    .or_insert_with(|| partitions_of(settings, &item.topic));
                let partition = partition_for(&item.key, partitions);
                let entry = SpoolEntry {
                    topic: item.topic.clone(),
                    partition,
                    event_id: id,
                    payload: String::from_utf8(item.envelope.to_bytes()).expect("JSON is UTF-8"),
                };
                table.insert(next, serde_json::to_vec(&entry).expect("serialises").as_slice()).map_err(storage)?;
                ids.insert(id, (item.topic.as_str(), partition, next)).map_err(storage)?;
                by_seq.insert(next, id).map_err(storage)?;
                next += 1;
                appended.push(Appended {
                    event_id: item.envelope.event_id,
                    topic: item.topic.clone(),
                    partition,
                    offset: None,
                    duplicate: false,
                });
            }
            results.push(appended);
        }
        meta.insert("next", next).map_err(storage)?;
        if let Some(cut) = next.checked_sub(settings.dedup_window) {
            let old: Vec<(u64, u128)> = by_seq
                .range(..cut)
                .map_err(storage)?
                .take(4096)
                .filter_map(|e| e.ok().map(|(k, v)| (k.value(), v.value())))
                .collect();
            for (seq, id) in old {
                by_seq.remove(seq).map_err(storage)?;
                ids.remove(id).map_err(storage)?;
            }
        }
    }
    txn.commit().map_err(storage)?;
    Ok(results)
}

#[async_trait]
impl EventLog for IggyLog {
    /// Creates the topics now when Iggy is reachable; otherwise they are created as soon as
    /// it is (the host does not wait for Iggy to start).
    async fn ensure_topics(&self, wanted: &[String]) -> Result<(), LogError> {
        let mut new = Vec::new();
        {
            let mut topics = self.topics.lock().expect("topics lock");
            for topic in wanted {
                crate::envelope::check_topic(topic).map_err(|e| LogError::Storage(format!("topic {topic:?}: {e}")))?;
                if !topics.contains_key(topic) {
                    topics.insert(topic.clone(), partitions_of(&self.settings, topic));
                    new.push(topic.clone());
                }
            }
        }
        if !new.is_empty() && self.health.lock().expect("health lock").connected {
            let remote = self.remote();
            for topic in &new {
                let created = tokio::time::timeout(REQUEST_TIMEOUT, remote.ensure_topic(topic)).await;
                if let Err(e) = created.unwrap_or_else(|_| Err("Iggy did not answer in time".into())) {
                    tracing::warn!(%topic, error = %e, "creating the topic in Iggy failed; will retry");
                    self.forward.notify_one();
                }
            }
        } else if !new.is_empty() {
            self.forward.notify_one();
        }
        Ok(())
    }

    async fn append(&self, items: Vec<AppendItem>) -> Result<Vec<Appended>, LogError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let writer = self.writer.as_ref().ok_or_else(|| LogError::Unavailable("the log is closing".into()))?;
        writer.send((items, reply)).map_err(|_| LogError::Unavailable("the spool writer has stopped".into()))?;
        answer.await.map_err(|_| LogError::Unavailable("the spool writer has stopped".into()))?
    }

    async fn poll(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<Record>, LogError> {
        if self.ends.lock().expect("ends lock").nothing_from(topic, partition, from) {
            return Ok(Vec::new());
        }
        let max = max.clamp(1, u32::MAX as usize);
        let mut records: Vec<Record> = Vec::new();
        let mut next = from;
        let mut cap = max;
        while records.len() < max {
            let count = cap.min(max - records.len());
            match self.poll_once(topic, partition, next, count as u32).await {
                Ok(batch) => {
                    let Some(last) = batch.last().map(|r| r.offset) else { break };
                    next = last + 1;
                    records.extend(batch);
                    // The usual case: one request. Only after shrinking the count (below)
                    // does it take more than one to fill the page.
                    if cap == max {
                        break;
                    }
                }
                // Iggy 0.8.0 answers InvalidOffset to any poll whose range covers a message
                // it cannot read: seen after a kill -9 and restart, one message of one
                // partition (the one being written at the kill), while the messages before
                // and after it read fine. Shrink the count to read up to it...
                Err(PollError::InvalidOffset) if count > 1 => cap = (count / 4).max(1),
                Err(PollError::InvalidOffset) => {
                    // ...and step over it if it is not past the end (InvalidOffset is also
                    // the answer for an offset past the end of a partition).
                    let end = self.high_watermark(topic, partition).await?;
                    if next >= end {
                        break;
                    }
                    tracing::warn!(
                        topic,
                        partition,
                        offset = next,
                        "Iggy cannot read this message (torn by a crash?); skipping it"
                    );
                    next += 1;
                    cap = max;
                }
                Err(PollError::Log(e)) if records.is_empty() => return Err(e),
                Err(PollError::Log(_)) => break,
            }
        }
        Ok(records)
    }

    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        if let Some(n) = self.topics.lock().expect("topics lock").get(topic) {
            return Ok(*n);
        }
        let details = self.topic_details(topic).await?;
        self.topics.lock().expect("topics lock").insert(topic.to_owned(), details.partitions_count);
        Ok(details.partitions_count)
    }

    async fn high_watermark(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        let details = self.topic_details(topic).await?;
        let p = details
            .partitions
            .iter()
            .find(|p| p.id == partition)
            .ok_or_else(|| LogError::NoSuchPartition { topic: topic.to_owned(), partition })?;
        Ok(if p.messages_count == 0 { 0 } else { p.current_offset + 1 })
    }

    async fn topics(&self) -> Result<Vec<String>, LogError> {
        let mut names: BTreeSet<String> = self.topics.lock().expect("topics lock").keys().cloned().collect();
        if let Ok(Some(stream)) = answered(self.reader.get_stream(&self.stream)).await {
            names.extend(stream.topics.into_iter().map(|t| t.name));
        }
        Ok(names.into_iter().collect())
    }

    fn shares_fanout(&self) -> bool {
        true
    }

    async fn topic_epoch(&self, topic: &str) -> Result<u64, LogError> {
        // Microseconds fit in 53 bits (a JSON number) until the year 2255.
        Ok(self.topic_details(topic).await?.created_at.as_micros())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    fn note_consumer_offset(&self, consumer: &str, topic: &str, partition: u32, next: u64) {
        self.consumer_offsets
            .lock()
            .expect("offsets lock")
            .insert((format!("owlery-{consumer}"), topic.to_owned(), partition), next);
    }

    async fn status(&self) -> serde_json::Value {
        let health = self.health.lock().expect("health lock").clone();
        let mut topics = serde_json::Map::new();
        if health.connected {
            let names: Vec<String> = self.topics.lock().expect("topics lock").keys().cloned().collect();
            for name in names {
                if let Ok(details) = self.topic_details(&name).await {
                    let partitions: serde_json::Map<String, serde_json::Value> = details
                        .partitions
                        .iter()
                        .map(|p| {
                            let next = if p.messages_count == 0 { 0 } else { p.current_offset + 1 };
                            (p.id.to_string(), next.into())
                        })
                        .collect();
                    topics.insert(name, partitions.into());
                }
            }
        }
        serde_json::json!({
            "backend": "iggy",
            "address": self.settings.address,
            "stream": self.settings.stream,
            "connected": health.connected,
            "lastError": health.last_error,
            "lastErrorAt": health.last_error_at,
            "spoolDepth": self.spool_depth(),
            "forwarded": health.forwarded,
            "topics": topics,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use owlery_testkit::IggyServer;

    use super::{IggyLog, IggySettings};
    use crate::log::{EventLog, contract};

    contract::contract_suite!(skip_if: owlery_skip_iggy, {
        let server = IggyServer::start(false);
        let address = server.address();
        let open = move |dir: &Path| -> Arc<dyn EventLog> {
            let settings = IggySettings { address: address.clone(), partitions: 3, ..IggySettings::default() };
            Arc::new(IggyLog::open(dir, settings).unwrap())
        };
        (server, open)
    });
}
