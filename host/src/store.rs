//! The host's own durable store: plugin state, plugin offsets, the fan-out log and the
//! outbox of events plugins publish, all in one redb file so that a plugin's batch commits
//! its state writes, new offsets, broadcasts and publishes in one transaction.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

pub use crate::effects::Broadcast;
use crate::log::AppendItem;

/// (plugin, key) → value
const STATE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("plugin_state");
/// (plugin, topic, partition) → next offset to read
const OFFSETS: TableDefinition<(&str, &str, u32), u64> = TableDefinition::new("plugin_offsets");
/// fan-out offset → FanoutRecord JSON
const FANOUT: TableDefinition<u64, &[u8]> = TableDefinition::new("fanout");
/// outbox sequence → OutboxEntry JSON
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// counters: "fanout_next", "outbox_next", and "epoch" (random, fixed when the store is made;
/// with a shared fan-out log, that log's)
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// broadcast id → fan-out offset, for the records mirrored from a shared fan-out log
const FANOUT_IDS: TableDefinition<u128, u64> = TableDefinition::new("fanout_ids");
/// fan-out offset → broadcast id, to forget the oldest ids
const FANOUT_ID_AT: TableDefinition<u64, u128> = TableDefinition::new("fanout_id_at");
/// Event type of the envelopes that carry broadcasts in a shared fan-out topic.
pub const BROADCAST_TYPE: &str = "owlery.broadcast";

#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(String);

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError(e.into().to_string())
}

/// A broadcast as recorded in the fan-out log. `payload` is JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FanoutRecord {
    pub offset: u64,
    /// The broadcast's id (nil for records written before ids existed).
    #[serde(default)]
    pub id: uuid::Uuid,
    pub room: String,
    pub plugin: String,
    pub payload: String,
    /// When it was committed (ms since the epoch), for retention by age.
    #[serde(default)]
    pub at_ms: u64,
}

/// An event waiting to be appended to the log (published by a plugin, or a dead letter).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OutboxEntry {
    topic: String,
    key: String,
    envelope: crate::envelope::Envelope,
}

/// Everything one successful batch of one plugin changes.
#[derive(Debug, Default)]
pub struct BatchCommit {
    /// key → new value, or `None` to delete
    pub state_writes: BTreeMap<String, Option<Vec<u8>>>,
    /// (topic, partition) → next offset to read
    pub offsets: Vec<(String, u32, u64)>,
    pub broadcasts: Vec<Broadcast>,
    /// events to append to the log after the commit
    pub outbox: Vec<AppendItem>,
}

impl BatchCommit {
    pub fn is_empty(&self) -> bool {
        self.state_writes.is_empty() && self.offsets.is_empty() && self.broadcasts.is_empty() && self.outbox.is_empty()
    }
}

pub struct Store {
    db: Database,
    /// Held from a batch's commit until its fan-out records are handed on, so that they
    /// reach the hub in offset order.
    commit_order: std::sync::Mutex<()>,
    /// Fan-out records kept; older ones are trimmed (a resuming client is told).
    fanout_retention: u64,
    /// Fan-out records older than this are trimmed too (0: no age limit).
    fanout_max_age_ms: u64,
    /// With a shared fan-out log (see `share_fanout`), its topic: broadcasts go to the
    /// outbox for it, and the fan-out table mirrors it.
    shared_topic: Option<String>,
}

impl Store {
    /// `fanout_retention` broadcasts are kept for resuming clients, none older than
    /// `fanout_max_age` (zero: no age limit).
    pub fn open(dir: &Path, fanout_retention: u64, fanout_max_age: std::time::Duration) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError(format!("{}: {e}", dir.display())))?;
        let db = Database::create(dir.join("store.redb")).map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(STATE).map_err(db_err)?;
        txn.open_table(OFFSETS).map_err(db_err)?;
        txn.open_table(FANOUT).map_err(db_err)?;
        txn.open_table(OUTBOX).map_err(db_err)?;
        txn.open_table(FANOUT_IDS).map_err(db_err)?;
        txn.open_table(FANOUT_ID_AT).map_err(db_err)?;
        {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            if meta.get("epoch").map_err(db_err)?.is_none() {
                // Tells a resuming client that the fan-out log it knew is not this one.
                let epoch = (uuid::Uuid::new_v4().as_u128() as u64) >> 11;
                meta.insert("epoch", epoch).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(Store {
            db,
            commit_order: std::sync::Mutex::new(()),
            fanout_retention: fanout_retention.max(1),
            fanout_max_age_ms: fanout_max_age.as_millis() as u64,
            shared_topic: None,
        })
    }

    /// Broadcasts go to `topic` of the log (through the outbox, committed with the batch)
    /// instead of straight into the fan-out table, which then mirrors that topic (see
    /// `mirror_fanout`): every host on the same log serves the same fan-out offsets.
    pub fn share_fanout(&mut self, topic: &str) {
        self.shared_topic = Some(topic.to_owned());
    }

    /// The envelope that carries a broadcast in a shared fan-out topic.
    fn broadcast_envelope(plugin: &str, broadcast: &Broadcast, at_ms: u64) -> crate::envelope::Envelope {
        let payload = serde_json::from_str(&broadcast.payload).unwrap_or(serde_json::Value::Null);
        crate::envelope::Envelope {
            event_id: broadcast.id,
            event_type: BROADCAST_TYPE.to_owned(),
            timestamp: crate::envelope::now_rfc3339(),
            source: format!("plugin:{plugin}"),
            user_id: None,
            metadata: serde_json::Map::new(),
            data: serde_json::json!({"room": broadcast.room, "plugin": plugin, "atMs": at_ms, "payload": payload}),
            extra: serde_json::Map::new(),
        }
    }

    /// Commit one plugin batch atomically, then hand its fan-out records (with their
    /// offsets) to `committed`; records of successive commits are handed on in order.
    pub fn commit_batch(
        &self,
        plugin: &str,
        batch: &BatchCommit,
        committed: impl FnOnce(Vec<FanoutRecord>),
    ) -> Result<(), StoreError> {
        let _order = self.commit_order.lock().unwrap_or_else(|e| e.into_inner());
        let txn = self.db.begin_write().map_err(db_err)?;
        let mut fanout = Vec::with_capacity(batch.broadcasts.len());
        {
            let mut state = txn.open_table(STATE).map_err(db_err)?;
            for (key, value) in &batch.state_writes {
                match value {
                    Some(v) => state.insert((plugin, key.as_str()), v.as_slice()).map(drop),
                    None => state.remove((plugin, key.as_str())).map(drop),
                }
                .map_err(db_err)?;
            }
            let mut offsets = txn.open_table(OFFSETS).map_err(db_err)?;
            for (topic, partition, next) in &batch.offsets {
                offsets.insert((plugin, topic.as_str(), *partition), *next).map_err(db_err)?;
            }
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let mut outbox: Vec<AppendItem> = Vec::new();
            if let Some(topic) = self.shared_topic.as_ref().filter(|_| !batch.broadcasts.is_empty()) {
                let now = crate::envelope::now_millis();
                outbox.extend(batch.broadcasts.iter().map(|b| AppendItem {
                    topic: topic.clone(),
                    key: String::new(),
                    envelope: Self::broadcast_envelope(plugin, b, now),
                }));
            } else if !batch.broadcasts.is_empty() {
                let mut table = txn.open_table(FANOUT).map_err(db_err)?;
                let mut next = meta.get("fanout_next").map_err(db_err)?.map_or(0, |v| v.value());
                let now = crate::envelope::now_millis();
                for broadcast in &batch.broadcasts {
                    let record = FanoutRecord {
                        offset: next,
                        id: broadcast.id,
                        room: broadcast.room.clone(),
                        plugin: plugin.to_owned(),
                        payload: broadcast.payload.clone(),
                        at_ms: now,
                    };
                    table.insert(next, serde_json::to_vec(&record).expect("serialises").as_slice()).map_err(db_err)?;
                    fanout.push(record);
                    next += 1;
                }
                meta.insert("fanout_next", next).map_err(db_err)?;
                self.trim_fanout(&mut table, next, now)?;
            }
            if !batch.outbox.is_empty() || !outbox.is_empty() {
                let mut table = txn.open_table(OUTBOX).map_err(db_err)?;
                let mut next = meta.get("outbox_next").map_err(db_err)?.map_or(0, |v| v.value());
                for item in batch.outbox.iter().chain(&outbox) {
                    let entry = OutboxEntry {
                        topic: item.topic.clone(),
                        key: item.key.clone(),
                        envelope: item.envelope.clone(),
                    };
                    table.insert(next, serde_json::to_vec(&entry).expect("serialises").as_slice()).map_err(db_err)?;
                    next += 1;
                }
                meta.insert("outbox_next", next).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        committed(fanout);
        Ok(())
    }

    /// Drop what is past retention (by count, then by age), a little at a time.
    fn trim_fanout(&self, table: &mut redb::Table<u64, &[u8]>, next: u64, now: u64) -> Result<(), StoreError> {
        let by_count = next.saturating_sub(self.fanout_retention);
        let too_old = |value: &[u8]| {
            self.fanout_max_age_ms > 0
                && serde_json::from_slice::<FanoutRecord>(value).is_ok_and(|r| r.at_ms + self.fanout_max_age_ms < now)
        };
        let old: Vec<u64> = table
            .iter()
            .map_err(db_err)?
            .take(1024)
            .map_while(|e| e.ok())
            .take_while(|(k, v)| k.value() < by_count || too_old(v.value()))
            .map(|(k, _)| k.value())
            .collect();
        for key in old {
            table.remove(key).map_err(db_err)?;
        }
        Ok(())
    }

    /// Mirror records read from the shared fan-out log (their offsets are the log's), up to
    /// `next` (the offset after the last one read, valid or not). A record whose id was
    /// already seen within the retention window before it (the same broadcast sent again by
    /// a retry, or made by another host running the same plugin) is a copy and is dropped:
    /// every host decides this the same way, from the log alone. Returns the records kept,
    /// in order, to hand to the connected clients.
    pub fn mirror_fanout(&self, records: Vec<FanoutRecord>, next: u64) -> Result<Vec<FanoutRecord>, StoreError> {
        let _order = self.commit_order.lock().unwrap_or_else(|e| e.into_inner());
        let window = self.fanout_retention;
        let txn = self.db.begin_write().map_err(db_err)?;
        let mut kept = Vec::with_capacity(records.len());
        {
            let mut table = txn.open_table(FANOUT).map_err(db_err)?;
            let mut ids = txn.open_table(FANOUT_IDS).map_err(db_err)?;
            let mut id_at = txn.open_table(FANOUT_ID_AT).map_err(db_err)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let mirrored = meta.get("fanout_next").map_err(db_err)?.map_or(0, |v| v.value());
            for record in records {
                if record.offset < mirrored {
                    continue;
                }
                let id = record.id.as_u128();
                let seen = ids.get(id).map_err(db_err)?.map(|v| v.value());
                if seen.is_some_and(|at| at + window > record.offset) {
                    continue;
                }
                if let Some(at) = seen {
                    id_at.remove(at).map_err(db_err)?;
                }
                ids.insert(id, record.offset).map_err(db_err)?;
                id_at.insert(record.offset, id).map_err(db_err)?;
                table
                    .insert(record.offset, serde_json::to_vec(&record).expect("serialises").as_slice())
                    .map_err(db_err)?;
                kept.push(record);
            }
            let next = next.max(mirrored);
            meta.insert("fanout_next", next).map_err(db_err)?;
            // Ids older than the window are forgotten (a little at a time).
            let cut = next.saturating_sub(window);
            let old: Vec<(u64, u128)> = id_at
                .range(..cut)
                .map_err(db_err)?
                .take(4096)
                .map_while(|e| e.ok())
                .map(|(k, v)| (k.value(), v.value()))
                .collect();
            for (at, id) in old {
                id_at.remove(at).map_err(db_err)?;
                ids.remove(id).map_err(db_err)?;
            }
            self.trim_fanout(&mut table, next, crate::envelope::now_millis())?;
        }
        txn.commit().map_err(db_err)?;
        Ok(kept)
    }

    /// Start the fan-out table afresh as the mirror of a shared log of epoch `epoch`, from
    /// offset `from` (a host new to the log, or a log that was reset).
    pub fn reset_fanout(&self, epoch: u64, from: u64) -> Result<(), StoreError> {
        let _order = self.commit_order.lock().unwrap_or_else(|e| e.into_inner());
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            txn.open_table(FANOUT).map_err(db_err)?.retain(|_, _| false).map_err(db_err)?;
            txn.open_table(FANOUT_IDS).map_err(db_err)?.retain(|_, _| false).map_err(db_err)?;
            txn.open_table(FANOUT_ID_AT).map_err(db_err)?.retain(|_, _| false).map_err(db_err)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            meta.insert("epoch", epoch).map_err(db_err)?;
            meta.insert("fanout_next", from).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    pub fn state_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(STATE).map_err(db_err)?;
        Ok(table.get((plugin, key)).map_err(db_err)?.map(|v| v.value().to_vec()))
    }

    /// Every (key, value) of `plugin` whose key starts with `prefix`, in key order.
    pub fn state_scan(&self, plugin: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(STATE).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.range((plugin, prefix)..).map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            let (owner, k) = key.value();
            if owner != plugin || !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_owned(), value.value().to_vec()));
        }
        Ok(out)
    }

    /// The plugin's committed offsets: (topic, partition) → next offset to read.
    pub fn offsets(&self, plugin: &str) -> Result<HashMap<(String, u32), u64>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(OFFSETS).map_err(db_err)?;
        let mut out = HashMap::new();
        for entry in table.range((plugin, "", 0)..).map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            let (owner, topic, partition) = key.value();
            if owner != plugin {
                break;
            }
            out.insert((topic.to_owned(), partition), value.value());
        }
        Ok(out)
    }

    /// Drop a plugin's state and offsets (replay from zero, purge).
    pub fn reset_plugin(&self, plugin: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut state = txn.open_table(STATE).map_err(db_err)?;
            state.retain(|(owner, _), _| owner != plugin).map_err(db_err)?;
            let mut offsets = txn.open_table(OFFSETS).map_err(db_err)?;
            offsets.retain(|(owner, _, _), _| owner != plugin).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    /// Make `from`'s state and offsets `to`'s, in one transaction (a shadow's promotion).
    /// `to`'s old state and offsets are dropped, and `from` is left empty.
    pub fn promote_namespace(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut state = txn.open_table(STATE).map_err(db_err)?;
            state.retain(|(owner, _), _| owner != to).map_err(db_err)?;
            let moved: Vec<(String, Vec<u8>)> = state
                .range((from, "")..)
                .map_err(db_err)?
                .map_while(|e| e.ok())
                .map(|(k, v)| (k.value().0.to_owned(), k.value().1.to_owned(), v.value().to_vec()))
                .take_while(|(owner, _, _)| owner == from)
                .map(|(_, k, v)| (k, v))
                .collect();
            for (key, value) in &moved {
                state.insert((to, key.as_str()), value.as_slice()).map_err(db_err)?;
            }
            state.retain(|(owner, _), _| owner != from).map_err(db_err)?;
            let mut offsets = txn.open_table(OFFSETS).map_err(db_err)?;
            offsets.retain(|(owner, _, _), _| owner != to).map_err(db_err)?;
            let moved: Vec<(String, u32, u64)> = offsets
                .range((from, "", 0)..)
                .map_err(db_err)?
                .map_while(|e| e.ok())
                .map(|(k, v)| (k.value().0.to_owned(), k.value().1.to_owned(), k.value().2, v.value()))
                .take_while(|(owner, _, _, _)| owner == from)
                .map(|(_, t, p, n)| (t, p, n))
                .collect();
            for (topic, partition, next) in &moved {
                offsets.insert((to, topic.as_str(), *partition), *next).map_err(db_err)?;
            }
            offsets.retain(|(owner, _, _), _| owner != from).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    /// Fan-out records with offset ≥ `from`, at most `max`; and the oldest offset retained.
    pub fn fanout_from(&self, from: u64, max: usize) -> Result<(Vec<FanoutRecord>, u64), StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(FANOUT).map_err(db_err)?;
        let oldest =
            table.first().map_err(db_err)?.map_or_else(|| self.fanout_next_in(&txn), |(k, _)| Ok(k.value()))?;
        let mut out = Vec::new();
        for entry in table.range(from..).map_err(db_err)?.take(max) {
            let (_, value) = entry.map_err(db_err)?;
            out.push(serde_json::from_slice(value.value()).map_err(|e| StoreError(e.to_string()))?);
        }
        Ok((out, oldest))
    }

    /// Fan-out records kept for resuming clients (also the window within which a repeated
    /// broadcast id in a shared fan-out log is a copy).
    pub fn fanout_window(&self) -> u64 {
        self.fanout_retention
    }

    /// The fan-out log's epoch: a new store (a reset log) has a new one.
    pub fn epoch(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let meta = txn.open_table(META).map_err(db_err)?;
        Ok(meta.get("epoch").map_err(db_err)?.map_or(0, |v| v.value()))
    }

    /// The offset the next broadcast will get.
    pub fn fanout_next(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        self.fanout_next_in(&txn)
    }

    fn fanout_next_in(&self, txn: &redb::ReadTransaction) -> Result<u64, StoreError> {
        let meta = txn.open_table(META).map_err(db_err)?;
        Ok(meta.get("fanout_next").map_err(db_err)?.map_or(0, |v| v.value()))
    }

    /// The oldest `max` outbox entries, in order, with their sequence numbers.
    pub fn outbox_peek(&self, max: usize) -> Result<Vec<(u64, AppendItem)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(OUTBOX).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)?.take(max) {
            let (seq, value) = entry.map_err(db_err)?;
            let e: OutboxEntry = serde_json::from_slice(value.value()).map_err(|e| StoreError(e.to_string()))?;
            out.push((seq.value(), AppendItem { topic: e.topic, key: e.key, envelope: e.envelope }));
        }
        Ok(out)
    }

    /// Forget outbox entries up to and including `last` (they are in the log now).
    pub fn outbox_remove_through(&self, last: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(OUTBOX).map_err(db_err)?;
            table.retain_in(..=last, |_, _| false).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }
}

/// The runtime reads plugin state through this narrow view; it never sees redb.
impl crate::runtime::StateView for Store {
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, crate::runtime::StateError> {
        self.state_get(namespace, key).map_err(crate::runtime::StateError::new)
    }

    fn scan(&self, namespace: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, crate::runtime::StateError> {
        self.state_scan(namespace, prefix).map_err(crate::runtime::StateError::new)
    }
}

#[cfg(test)]
mod tests {
    use super::{FanoutRecord, Store};

    fn record(offset: u64, id: u128) -> FanoutRecord {
        FanoutRecord {
            offset,
            id: uuid::Uuid::from_u128(id),
            room: "all".into(),
            plugin: "p".into(),
            payload: format!("{{\"n\":{offset}}}"),
            at_ms: crate::envelope::now_millis(),
        }
    }

    fn offsets(records: &[FanoutRecord]) -> Vec<u64> {
        records.iter().map(|r| r.offset).collect()
    }

    #[test]
    fn a_mirrored_broadcast_seen_within_the_window_is_a_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 4, std::time::Duration::ZERO).unwrap();
        store.reset_fanout(7, 0).unwrap();
        // ids 1, 2, 1 (a copy), 3, then 1 again more than 4 records after its first time.
        let kept = store.mirror_fanout(vec![record(0, 1), record(1, 2), record(2, 1), record(3, 3)], 4).unwrap();
        assert_eq!(offsets(&kept), [0, 1, 3]);
        let kept = store.mirror_fanout(vec![record(4, 4), record(5, 1), record(6, 3)], 7).unwrap();
        assert_eq!(offsets(&kept), [4, 5], "1 is 5 records after its first time (new again); 3 is 3 after (a copy)");
        assert_eq!(store.fanout_next().unwrap(), 7);
        assert_eq!(store.epoch().unwrap(), 7);
        // Records already mirrored are not taken twice; a reset starts over.
        assert!(store.mirror_fanout(vec![record(6, 9)], 7).unwrap().is_empty());
        store.reset_fanout(8, 100).unwrap();
        let (records, oldest) = store.fanout_from(0, 10).unwrap();
        assert!(records.is_empty());
        assert_eq!(oldest, 100);
    }
}
