//! The local durable spool: every accepted publish is written here first (group commit,
//! deduplicated by `eventId` over a window), and leaves once Iggy acknowledged it. The last
//! acknowledged entries stay a while (`recent`), to be sent again after a lost connection.
//! An entry that cannot be read back, or that Iggy refuses again and again, is set aside
//! (`aside`, with the reason) so that the entries behind it still go out.

use std::path::Path;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::log::dedup::{Ids, IdsByPosition, SeenIds};
use crate::log::{AppendItem, Appended, LogError, StorageError, key_hash, partition_of_hash};

/// spool sequence → SpoolEntry JSON, in acceptance order
const SPOOL: TableDefinition<u64, &[u8]> = TableDefinition::new("spool");
/// eventId → (topic, partition, sequence) for the deduplication window
const IDS: Ids = TableDefinition::new("ids");
/// sequence → eventId, to drop the oldest ids past the window
const IDS_BY_SEQ: IdsByPosition = TableDefinition::new("ids_by_seq");
/// "next" → next sequence
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// spool sequence → SpoolEntry JSON: the last `keep_recent` entries Iggy acknowledged
const RECENT: TableDefinition<u64, &[u8]> = TableDefinition::new("recent");
/// spool sequence → JSON `{reason, at, entry}`: entries set aside, kept for inspection
const ASIDE: TableDefinition<u64, &[u8]> = TableDefinition::new("aside");

/// Entries one `peek` looks at, at most.
const SCAN: usize = 8192;

/// Where a spooled entry goes, read without its payload.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    topic: std::borrow::Cow<'a, str>,
    partition: u32,
    #[serde(default)]
    key_hash: Option<u64>,
}

/// Where a spooled entry goes, as `peek` shows it to its filter.
pub(super) struct Destination<'a> {
    pub(super) topic: &'a str,
    pub(super) partition: u32,
    pub(super) key_hash: Option<u64>,
}

/// One spooled entry: what to send, or why it cannot be read back.
pub(super) type Peeked = (u64, Result<SpoolEntry, String>);

#[derive(Serialize, Deserialize)]
pub(super) struct SpoolEntry {
    pub(super) topic: String,
    /// The partition it was accepted for (and answered with), of as many as the host
    /// knew the topic to have then.
    pub(super) partition: u32,
    pub(super) event_id: u128,
    pub(super) payload: String,
    /// The hash of its routing key (see `log::key_hash`), so that it goes to its key's
    /// partition of the topic's partitions in Iggy even when the host accepted it before
    /// it knew how many those are. Missing in entries spooled by earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) key_hash: Option<u64>,
}

pub(super) struct Spool {
    db: Database,
    /// Acknowledged entries kept in `recent`.
    keep_recent: u64,
}

impl Spool {
    /// Open (or create) the spool in `dir/spool.redb`.
    pub(super) fn open(dir: &Path, keep_recent: u64) -> Result<Spool, LogError> {
        std::fs::create_dir_all(dir).map_err(|source| StorageError::Directory { path: dir.to_owned(), source })?;
        let db = open_database(&dir.join("spool.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(SPOOL)?;
        txn.open_table(IDS)?;
        txn.open_table(IDS_BY_SEQ)?;
        txn.open_table(META)?;
        txn.open_table(RECENT)?;
        txn.open_table(ASIDE)?;
        txn.commit()?;
        Ok(Spool { db, keep_recent })
    }

    /// One durable transaction for a group of publish requests (dedup, spool, window
    /// upkeep) and the acknowledgements that came with them (see `acknowledged`): one
    /// fsync for both. `partitions` says how many partitions a topic has (or will get).
    pub(super) fn write(
        &self,
        group: &[Vec<AppendItem>],
        acknowledged: &[u64],
        partitions: impl Fn(&str) -> u32,
        dedup_window: u64,
    ) -> Result<Vec<Vec<Appended>>, LogError> {
        if group.is_empty() && acknowledged.is_empty() {
            return Ok(Vec::new());
        }
        let txn = self.db.begin_write()?;
        let results =
            if group.is_empty() { Vec::new() } else { self.accept_in(&txn, group, partitions, dedup_window)? };
        if !acknowledged.is_empty() {
            self.acknowledge_in(&txn, acknowledged)?;
        }
        txn.commit()?;
        Ok(results)
    }

    /// Publish requests only (`write` with no acknowledgements).
    #[cfg(test)]
    pub(super) fn accept(
        &self,
        group: &[Vec<AppendItem>],
        partitions: impl Fn(&str) -> u32,
        dedup_window: u64,
    ) -> Result<Vec<Vec<Appended>>, LogError> {
        self.write(group, &[], partitions, dedup_window)
    }

    fn accept_in(
        &self,
        txn: &redb::WriteTransaction,
        group: &[Vec<AppendItem>],
        partitions: impl Fn(&str) -> u32,
        dedup_window: u64,
    ) -> Result<Vec<Vec<Appended>>, LogError> {
        Ok({
            let mut table = txn.open_table(SPOOL)?;
            let mut meta = txn.open_table(META)?;
            let mut next = meta.get("next")?.map_or(0, |v| v.value());
            let mut seen = SeenIds::windowed(txn, IDS, IDS_BY_SEQ)?;
            let results = seen.append_each(group, false, |item| {
                let key_hash = key_hash(&item.key);
                let partition = partition_of_hash(key_hash, partitions(&item.topic));
                let entry = SpoolEntry {
                    topic: item.topic.clone(),
                    partition,
                    event_id: item.envelope.event_id.as_u128(),
                    payload: String::from_utf8(item.envelope.to_bytes()).expect("JSON is UTF-8"),
                    key_hash: Some(key_hash),
                };
                table.insert(next, serde_json::to_vec(&entry).expect("serialises").as_slice())?;
                next += 1;
                Ok((partition, next - 1))
            })?;
            meta.insert("next", next)?;
            if let Some(cut) = next.checked_sub(dedup_window) {
                seen.forget_before(cut)?;
            }
            results
        })
    }

    /// The oldest `max` entries waiting to be forwarded that `wanted` picks by sequence and
    /// destination (`None`: cannot be read), in order, among the oldest `SCAN`
    /// entries: a lane with nothing of its own in a large backlog must not read all of it
    /// every round.
    pub(super) fn peek(
        &self,
        max: usize,
        wanted: impl Fn(u64, Option<Destination<'_>>) -> bool,
    ) -> Result<Vec<Peeked>, LogError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SPOOL)?;
        let mut out = Vec::new();
        for entry in table.iter()?.take(SCAN) {
            let (seq, value) = entry?;
            // Where it goes, without copying its payload.
            let head = serde_json::from_slice::<Head<'_>>(value.value()).ok();
            let destination =
                head.as_ref().map(|h| Destination { topic: &h.topic, partition: h.partition, key_hash: h.key_hash });
            if !wanted(seq.value(), destination) {
                continue;
            }
            let parsed =
                serde_json::from_slice::<SpoolEntry>(value.value()).map_err(|e| format!("cannot be read back: {e}"));
            out.push((seq.value(), parsed));
            if out.len() == max {
                break;
            }
        }
        Ok(out)
    }

    /// The recently forwarded entries (see `keep_recent`), in order; any that cannot be
    /// read back are left out (they were sent once already).
    pub(super) fn recent(&self) -> Result<Vec<(u64, SpoolEntry)>, LogError> {
        Ok(self.entries(RECENT, usize::MAX)?.into_iter().filter_map(|(seq, entry)| Some((seq, entry.ok()?))).collect())
    }

    fn entries(&self, table: TableDefinition<u64, &[u8]>, max: usize) -> Result<Vec<Peeked>, LogError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(table)?;
        let mut out = Vec::new();
        for entry in table.iter()?.take(max) {
            let (seq, value) = entry?;
            let parsed =
                serde_json::from_slice::<SpoolEntry>(value.value()).map_err(|e| format!("cannot be read back: {e}"));
            out.push((seq.value(), parsed));
        }
        Ok(out)
    }

    /// Move entry `seq` out of the way, with `reason`: kept in the `aside` table.
    pub(super) fn set_aside(&self, seq: u64, reason: &str) -> Result<(), LogError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(SPOOL)?;
            let Some(bytes) = table.remove(seq)? else { return Ok(()) };
            let kept = serde_json::json!({
                "reason": reason,
                "at": crate::envelope::now_rfc3339(),
                "entry": String::from_utf8_lossy(bytes.value()),
            });
            let kept = serde_json::to_vec(&kept).map_err(StorageError::from)?;
            txn.open_table(ASIDE)?.insert(seq, kept.as_slice())?;
        }
        Ok(txn.commit()?)
    }

    /// Iggy acknowledged these: out of the spool, into the recently forwarded entries (in
    /// a transaction of their own; the writer thread puts them in its next `write`).
    pub(super) fn acknowledged(&self, seqs: &[u64]) -> Result<(), LogError> {
        self.write(&[], seqs, |_| 1, u64::MAX).map(drop)
    }

    fn acknowledge_in(&self, txn: &redb::WriteTransaction, seqs: &[u64]) -> Result<(), LogError> {
        {
            let mut table = txn.open_table(SPOOL)?;
            let mut recent = txn.open_table(RECENT)?;
            for seq in seqs {
                if let Some(value) = table.remove(*seq)? {
                    recent.insert(*seq, value.value())?;
                }
            }
            let kept = recent.len()?;
            if kept > self.keep_recent {
                let old: Vec<u64> = recent
                    .iter()?
                    .take((kept - self.keep_recent) as usize)
                    .map_while(|e| e.ok().map(|(k, _)| k.value()))
                    .collect();
                for seq in old {
                    recent.remove(seq)?;
                }
            }
        }
        Ok(())
    }

    /// Entries waiting to be forwarded (0 if the spool cannot be read).
    pub(super) fn depth(&self) -> u64 {
        self.count(SPOOL)
    }

    /// Entries set aside (0 if the spool cannot be read).
    pub(super) fn set_aside_count(&self) -> u64 {
        self.count(ASIDE)
    }

    /// Spool `bytes` as the next entry, as they are (a test's way to a damaged entry).
    #[cfg(test)]
    pub(super) fn insert_raw(&self, bytes: &[u8]) {
        let txn = self.db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            let next = meta.get("next").unwrap().map_or(0, |v| v.value());
            txn.open_table(SPOOL).unwrap().insert(next, bytes).unwrap();
            meta.insert("next", next + 1).unwrap();
        }
        txn.commit().unwrap();
    }

    fn count(&self, table: TableDefinition<u64, &[u8]>) -> u64 {
        let Ok(txn) = self.db.begin_read() else { return 0 };
        txn.open_table(table).ok().and_then(|t| t.len().ok()).unwrap_or(0)
    }
}

/// Open the spool's file; a previous `IggyLog` of this directory may still be letting go
/// of it (its background tasks end a moment after it is dropped).
fn open_database(path: &Path) -> Result<Database, LogError> {
    let mut tries = 0;
    loop {
        match Database::create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if tries < 250 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}
