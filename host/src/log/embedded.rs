//! The embedded log: topics and partitions in one redb file on local disk.
//!
//! Appends from all producers go through one writer thread that commits whatever has queued
//! up in a single durable transaction (group commit), then answers every waiting producer
//! and wakes the readers. Deduplication by `eventId` happens in the same transaction.

use std::path::Path;
use std::sync::{Arc, mpsc};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{oneshot, watch};

use super::{AppendItem, Appended, EventLog, LogError, Record, partition_for};

/// topic → number of partitions
const TOPICS: TableDefinition<&str, u32> = TableDefinition::new("topics");
/// (topic, partition) → next offset
const HEADS: TableDefinition<(&str, u32), u64> = TableDefinition::new("heads");
/// (topic, partition, offset) → envelope JSON
const RECORDS: TableDefinition<(&str, u32, u64), &[u8]> = TableDefinition::new("records");
/// eventId → (topic, partition, offset) of its first copy
const EVENT_IDS: TableDefinition<u128, (&str, u32, u64)> = TableDefinition::new("event_ids");

/// Requests taken into one transaction at most.
const MAX_GROUP: usize = 1024;

type Reply = oneshot::Sender<Result<Vec<Appended>, LogError>>;

pub struct EmbeddedLog {
    db: Arc<Database>,
    /// `None` only while dropping.
    writer: Option<mpsc::Sender<(Vec<AppendItem>, Reply)>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    changes: watch::Receiver<u64>,
    default_partitions: u32,
}

fn storage(e: impl Into<redb::Error>) -> LogError {
    LogError::Storage(e.into().to_string())
}

impl EmbeddedLog {
    /// Open (or create) the log in `dir/log.redb`. New topics get `default_partitions`.
    pub fn open(dir: &Path, default_partitions: u32) -> Result<EmbeddedLog, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| LogError::Storage(format!("{}: {e}", dir.display())))?;
        let db = Arc::new(Database::create(dir.join("log.redb")).map_err(storage)?);
        {
            let txn = db.begin_write().map_err(storage)?;
            txn.open_table(TOPICS).map_err(storage)?;
            txn.open_table(HEADS).map_err(storage)?;
            txn.open_table(RECORDS).map_err(storage)?;
            txn.open_table(EVENT_IDS).map_err(storage)?;
            txn.commit().map_err(storage)?;
        }
        let (tx, rx) = mpsc::channel();
        let (changes_tx, changes) = watch::channel(0);
        let writer_db = db.clone();
        let partitions = default_partitions.max(1);
        let writer_thread = std::thread::Builder::new()
            .name("owlery-log-writer".into())
            .spawn(move || write_loop(&writer_db, &rx, &changes_tx, partitions))
            .map_err(|e| LogError::Storage(e.to_string()))?;
        Ok(EmbeddedLog {
            db,
            writer: Some(tx),
            writer_thread: Some(writer_thread),
            changes,
            default_partitions: partitions,
        })
    }
}

impl Drop for EmbeddedLog {
    /// Let the writer finish what is queued and close the file, so it can be opened again.
    fn drop(&mut self) {
        drop(self.writer.take());
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_loop(
    db: &Database,
    requests: &mpsc::Receiver<(Vec<AppendItem>, Reply)>,
    changes: &watch::Sender<u64>,
    default_partitions: u32,
) {
    while let Ok(first) = requests.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match requests.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        match commit_group(db, &group, default_partitions) {
            Ok(results) => {
                changes.send_modify(|n| *n += 1);
                for ((_, reply), result) in group.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, requests = group.len(), "log append failed; nothing of these requests was written");
                for (_, reply) in group {
                    let _ = reply.send(Err(LogError::Storage(e.to_string())));
                }
            }
        }
    }
}

fn commit_group(
    db: &Database,
    group: &[(Vec<AppendItem>, Reply)],
    default_partitions: u32,
) -> Result<Vec<Vec<Appended>>, LogError> {
    let txn = db.begin_write().map_err(storage)?;
    let mut results = Vec::with_capacity(group.len());
    {
        let mut topics = txn.open_table(TOPICS).map_err(storage)?;
        let mut heads = txn.open_table(HEADS).map_err(storage)?;
        let mut records = txn.open_table(RECORDS).map_err(storage)?;
        let mut ids = txn.open_table(EVENT_IDS).map_err(storage)?;
        for (items, _) in group {
            let mut appended = Vec::with_capacity(items.len());
            for item in items {
                let id = item.envelope.event_id.as_u128();
                if let Some(first) = ids.get(id).map_err(storage)? {
                    let (topic, partition, offset) = first.value();
                    appended.push(Appended {
                        event_id: item.envelope.event_id,
                        topic: topic.to_owned(),
                        partition,
                        offset: Some(offset),
                        duplicate: true,
                    });
                    continue;
                }
                let known = topics.get(item.topic.as_str()).map_err(storage)?.map(|n| n.value());
                let partitions = match known {
                    Some(n) => n,
                    None => {
                        topics.insert(item.topic.as_str(), default_partitions).map_err(storage)?;
                        default_partitions
                    }
                };
                let partition = partition_for(&item.key, partitions);
                let offset = heads.get((item.topic.as_str(), partition)).map_err(storage)?.map_or(0, |h| h.value());
                records
                    .insert((item.topic.as_str(), partition, offset), item.envelope.to_bytes().as_slice())
                    .map_err(storage)?;
                heads.insert((item.topic.as_str(), partition), offset + 1).map_err(storage)?;
                ids.insert(id, (item.topic.as_str(), partition, offset)).map_err(storage)?;
                appended.push(Appended {
                    event_id: item.envelope.event_id,
                    topic: item.topic.clone(),
                    partition,
                    offset: Some(offset),
                    duplicate: false,
                });
            }
            results.push(appended);
        }
    }
    txn.commit().map_err(storage)?;
    Ok(results)
}

impl EmbeddedLog {
    fn partitions_sync(&self, topic: &str) -> Result<u32, LogError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(TOPICS).map_err(storage)?;
        let n = table.get(topic).map_err(storage)?.map(|v| v.value());
        n.ok_or_else(|| LogError::NoSuchTopic(topic.to_owned()))
    }

    fn check_partition(&self, topic: &str, partition: u32) -> Result<(), LogError> {
        if partition >= self.partitions_sync(topic)? {
            return Err(LogError::NoSuchPartition { topic: topic.to_owned(), partition });
        }
        Ok(())
    }
}

#[async_trait]
impl EventLog for EmbeddedLog {
    async fn ensure_topics(&self, wanted: &[String]) -> Result<(), LogError> {
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut topics = txn.open_table(TOPICS).map_err(storage)?;
            for topic in wanted {
                if topics.get(topic.as_str()).map_err(storage)?.is_none() {
                    topics.insert(topic.as_str(), self.default_partitions).map_err(storage)?;
                }
            }
        }
        txn.commit().map_err(storage)
    }

    async fn append(&self, items: Vec<AppendItem>) -> Result<Vec<Appended>, LogError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let writer = self.writer.as_ref().ok_or_else(|| LogError::Unavailable("the log is closing".into()))?;
        writer.send((items, reply)).map_err(|_| LogError::Unavailable("the log writer has stopped".into()))?;
        answer.await.map_err(|_| LogError::Unavailable("the log writer has stopped".into()))?
    }

    async fn poll(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<Record>, LogError> {
        self.check_partition(topic, partition)?;
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(RECORDS).map_err(storage)?;
        let mut out = Vec::with_capacity(max.min(1024));
        for entry in table.range((topic, partition, from)..=(topic, partition, u64::MAX)).map_err(storage)?.take(max) {
            let (key, value) = entry.map_err(storage)?;
            out.push(Record { partition, offset: key.value().2, payload: value.value().to_vec() });
        }
        Ok(out)
    }

    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        self.partitions_sync(topic)
    }

    async fn high_watermark(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.check_partition(topic, partition)?;
        let txn = self.db.begin_read().map_err(storage)?;
        let heads = txn.open_table(HEADS).map_err(storage)?;
        Ok(heads.get((topic, partition)).map_err(storage)?.map_or(0, |h| h.value()))
    }

    async fn topics(&self) -> Result<Vec<String>, LogError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(TOPICS).map_err(storage)?;
        let mut names = Vec::new();
        for entry in table.iter().map_err(storage)? {
            names.push(entry.map_err(storage)?.0.value().to_owned());
        }
        Ok(names)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::EmbeddedLog;
    use crate::log::{EventLog, contract};

    fn open(dir: &Path) -> Arc<dyn EventLog> {
        Arc::new(EmbeddedLog::open(dir, 4).unwrap())
    }

    contract::contract_suite!(skip_if: any(), ((), open));
}
