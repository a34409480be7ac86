//! The embedded log: topics and partitions in one redb file on local disk.
//!
//! Appends from all producers go through the group-commit writer, which wakes the readers
//! after each commit. Deduplication by `eventId` (every id, forever) happens in the same
//! transaction.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::dedup::{Ids, SeenIds};
use super::group_commit::{Appends, GroupCommit};
use super::{AppendItem, Appended, EventLog, LogError, Record, StorageError, partition_for};

/// topic → number of partitions
const TOPICS: TableDefinition<&str, u32> = TableDefinition::new("topics");
/// (topic, partition) → next offset
const HEADS: TableDefinition<(&str, u32), u64> = TableDefinition::new("heads");
/// (topic, partition, offset) → envelope JSON
const RECORDS: TableDefinition<(&str, u32, u64), &[u8]> = TableDefinition::new("records");
/// eventId → (topic, partition, offset) of its first copy
const EVENT_IDS: Ids = TableDefinition::new("event_ids");

pub struct EmbeddedLog {
    db: Arc<Database>,
    writer: GroupCommit,
    changes: watch::Receiver<u64>,
    default_partitions: u32,
}

impl EmbeddedLog {
    /// Open (or create) the log in `dir/log.redb`. New topics get `default_partitions`.
    pub fn open(dir: &Path, default_partitions: u32) -> Result<EmbeddedLog, LogError> {
        std::fs::create_dir_all(dir).map_err(|source| StorageError::Directory { path: dir.to_owned(), source })?;
        let db = Arc::new(Database::create(dir.join("log.redb"))?);
        {
            let txn = db.begin_write()?;
            txn.open_table(TOPICS)?;
            txn.open_table(HEADS)?;
            txn.open_table(RECORDS)?;
            txn.open_table(EVENT_IDS)?;
            txn.commit()?;
        }
        let (changes_tx, changes) = watch::channel(0);
        let writer_db = db.clone();
        let partitions = default_partitions.max(1);
        let writer = GroupCommit::start(
            "log writer",
            Appends(move |group: &[Vec<AppendItem>]| {
                let results = commit_group(&writer_db, group, partitions)?;
                changes_tx.send_modify(|n| *n += 1);
                Ok(results)
            }),
        )?;
        Ok(EmbeddedLog { db, writer, changes, default_partitions: partitions })
    }
}

/// One durable transaction for a group of append requests.
fn commit_group(
    db: &Database,
    group: &[Vec<AppendItem>],
    default_partitions: u32,
) -> Result<Vec<Vec<Appended>>, LogError> {
    let txn = db.begin_write()?;
    let results = {
        let mut topics = txn.open_table(TOPICS)?;
        let mut heads = txn.open_table(HEADS)?;
        let mut records = txn.open_table(RECORDS)?;
        SeenIds::all(&txn, EVENT_IDS)?.append_each(group, true, |item| {
            let topic = item.topic.as_str();
            let known = topics.get(topic)?.map(|n| n.value());
            let partitions = match known {
                Some(n) => n,
                None => {
                    topics.insert(topic, default_partitions)?;
                    default_partitions
                }
            };
            let partition = partition_for(&item.key, partitions);
            let offset = heads.get((topic, partition))?.map_or(0, |h| h.value());
            records.insert((topic, partition, offset), item.envelope.to_bytes().as_slice())?;
            heads.insert((topic, partition), offset + 1)?;
            Ok((partition, offset))
        })?
    };
    txn.commit()?;
    Ok(results)
}

impl EmbeddedLog {
    fn partitions_sync(&self, topic: &str) -> Result<u32, LogError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TOPICS)?;
        let n = table.get(topic)?.map(|v| v.value());
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
        let txn = self.db.begin_write()?;
        {
            let mut topics = txn.open_table(TOPICS)?;
            for topic in wanted {
                if topics.get(topic.as_str())?.is_none() {
                    topics.insert(topic.as_str(), self.default_partitions)?;
                }
            }
        }
        Ok(txn.commit()?)
    }

    async fn append(&self, items: Vec<AppendItem>) -> Result<Vec<Appended>, LogError> {
        self.writer.append(items).await
    }

    async fn poll(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<Record>, LogError> {
        self.check_partition(topic, partition)?;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        let mut out = Vec::with_capacity(max.min(1024));
        for entry in table.range((topic, partition, from)..=(topic, partition, u64::MAX))?.take(max) {
            let (key, value) = entry?;
            out.push(Record { partition, offset: key.value().2, payload: value.value().to_vec().into() });
        }
        Ok(out)
    }

    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        self.partitions_sync(topic)
    }

    async fn high_watermark(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.check_partition(topic, partition)?;
        let txn = self.db.begin_read()?;
        let heads = txn.open_table(HEADS)?;
        Ok(heads.get((topic, partition))?.map_or(0, |h| h.value()))
    }

    async fn topics(&self) -> Result<Vec<String>, LogError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TOPICS)?;
        let mut names = Vec::new();
        for entry in table.iter()? {
            names.push(entry?.0.value().to_owned());
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
