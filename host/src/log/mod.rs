//! The event log: the `EventLog` contract and its backends.
//!
//! The contract is written for a remote log that can fail (Iggy): every call is async and
//! fallible. `embedded` is the default backend, durable on local disk.

#[cfg(test)]
pub(crate) mod contract;
mod dedup;
pub mod embedded;
mod error;
#[cfg(test)]
pub(crate) mod failing;
mod group_commit;
pub mod iggy;

pub use error::{LogError, StorageError, Unavailable};

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use crate::envelope::Envelope;

/// One envelope to append, with the topic the routing chose and its partition key.
#[derive(Debug, Clone)]
pub struct AppendItem {
    pub topic: String,
    pub key: String,
    pub envelope: Envelope,
}

/// Where an appended envelope landed. `duplicate` is true when its `eventId` was already
/// accepted; then the position is the one of the first copy and nothing new was written.
/// `offset` is known only when the backend assigns it at append time (embedded); with Iggy
/// the event is durable in the local spool and gets its offset when forwarded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Appended {
    pub event_id: Uuid,
    pub topic: String,
    pub partition: u32,
    pub offset: Option<u64>,
    pub duplicate: bool,
}

/// One stored message: the envelope's JSON bytes at its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition: u32,
    pub offset: u64,
    /// Shared, not copied, between the readers given the same record (see `iggy::recent`).
    pub payload: bytes::Bytes,
}

#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Create the topics that are missing (idempotent).
    async fn ensure_topics(&self, topics: &[String]) -> Result<(), LogError>;

    /// Append all items durably, or none of them. A repeated `eventId` is accepted once.
    async fn append(&self, items: Vec<AppendItem>) -> Result<Vec<Appended>, LogError>;

    /// Append items that the caller already holds durably (the outbox) and keeps until
    /// this answers `Ok`, sending them again after an error: a backend may send them on
    /// without a durable copy of its own. A copy can then reach the log twice (readers skip
    /// copies by event id). After each connection loss (`losses`) the caller sends its
    /// last ones again.
    async fn forward(&self, items: Vec<AppendItem>) -> Result<(), Unforwarded> {
        self.append(items).await.map(drop).map_err(|error| Unforwarded { error, taken: Vec::new() })
    }

    /// Times the connection to the log was lost so far (0 for a local log): a crashed
    /// server can come back without the last messages it acknowledged (Iggy 0.8.0 was
    /// seen to), so whoever `forward`s sends its last entries again after each.
    fn losses(&self) -> u64 {
        0
    }

    /// Up to `max` records of one partition, starting at `from` (inclusive), in order.
    async fn poll(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<Record>, LogError>;

    /// Number of partitions of a topic.
    async fn partitions(&self, topic: &str) -> Result<u32, LogError>;

    /// The offset the next record of the partition will get (= records in it).
    async fn high_watermark(&self, topic: &str, partition: u32) -> Result<u64, LogError>;

    /// Every topic, sorted.
    async fn topics(&self) -> Result<Vec<String>, LogError>;

    /// Whether other hosts may read and write this log too (a remote server), so a topic
    /// in it is a way for hosts to see each other's events.
    fn is_shared(&self) -> bool {
        false
    }

    /// Which incarnation of `topic` this is: it changes when the topic is deleted and made
    /// again, so offsets into the old one are known to be stale.
    async fn topic_epoch(&self, _topic: &str) -> Result<u64, LogError> {
        Ok(0)
    }

    /// A counter that changes whenever anything is appended: wait on it to tail the log.
    fn changes(&self) -> watch::Receiver<u64>;

    /// A plugin committed `next` as its next offset; backends that can show consumer lag
    /// in their own tools record it (best effort, in the background).
    fn note_consumer_offset(&self, _consumer: &str, _topic: &str, _partition: u32, _next: u64) {}

    /// Whether the log is reachable and how much waits to reach it, from what the backend
    /// already knows (no request to a server): `/ready` is asked by anyone, often.
    fn readiness(&self) -> Readiness {
        Readiness { connected: true, spool_depth: 0 }
    }

    /// What `GET /api/monitoring/iggy-status` shows of the log.
    async fn status(&self) -> serde_json::Value {
        let mut topics = serde_json::Map::new();
        for topic in self.topics().await.unwrap_or_default() {
            let mut partitions = serde_json::Map::new();
            for partition in 0..self.partitions(&topic).await.unwrap_or(0) {
                let high = self.high_watermark(&topic, partition).await.unwrap_or(0);
                partitions.insert(partition.to_string(), high.into());
            }
            topics.insert(topic, partitions.into());
        }
        serde_json::json!({ "backend": "embedded", "connected": true, "topics": topics })
    }
}

/// A `forward` that failed: why, and which of the items the log took all the same
/// (indexes into what was forwarded), so that the caller does not send those again.
#[derive(Debug, thiserror::Error)]
#[error("{error} ({} of the entries taken all the same)", taken.len())]
pub struct Unforwarded {
    #[source]
    pub error: LogError,
    pub taken: Vec<usize>,
}

/// What `/ready` needs of the log (see `EventLog::readiness`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    pub connected: bool,
    /// Accepted events not yet in the log (the Iggy spool).
    pub spool_depth: u64,
}

/// How many records back (per partition) a backend may write a second copy of an event
/// it already wrote (a send retried after a lost acknowledgement). Consumers that skip
/// copies by event id remember at least this many. On Iggy, after a host crash: a spool
/// lane's round whose acknowledgement was not written yet and the round it was sending
/// (`FORWARD_BATCH` each), and the outbox's round and recent entries sent again, with room.
pub const REDELIVERY_WINDOW: u64 = 4 * iggy::FORWARD_BATCH as u64;

/// The partition of `partitions` that `key`'s events go to.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    partition_of_hash(key_hash(key), partitions)
}

/// FNV-1a: a stable hash, so a key maps to the same partition in every version of Owlery.
pub fn key_hash(key: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The partition of `partitions` that a key with this `key_hash` goes to.
pub fn partition_of_hash(hash: u64, partitions: u32) -> u32 {
    (hash % u64::from(partitions.max(1))) as u32
}
