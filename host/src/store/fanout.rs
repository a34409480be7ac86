//! The fan-out table: every broadcast by offset, kept for clients that resume (by count and
//! by age), and — with a shared fan-out log — a mirror of that log, in which a broadcast id
//! seen within the retention window is a copy.

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::{Broadcast, FANOUT, FANOUT_ID_AT, FANOUT_IDS, META, Store, StoreError};

/// A broadcast as recorded in the fan-out table. `payload` is JSON text.
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
    /// The event type of its cause (empty for records written before it was kept).
    #[serde(default)]
    pub event: String,
}

type FanoutTable<'t> = redb::Table<'t, u64, &'static [u8]>;
type MetaTable<'t> = redb::Table<'t, &'static str, u64>;

fn encode(record: &FanoutRecord) -> Vec<u8> {
    serde_json::to_vec(record).expect("a fan-out record serialises")
}

impl Store {
    /// Give `broadcasts` the next offsets, in a batch's transaction.
    pub(super) fn append_fanout(
        &self,
        table: &mut FanoutTable<'_>,
        meta: &mut MetaTable<'_>,
        plugin: &str,
        broadcasts: &[Broadcast],
        now: u64,
    ) -> Result<Vec<FanoutRecord>, StoreError> {
        let mut next = Store::meta(meta, "fanout_next")?;
        let mut records = Vec::with_capacity(broadcasts.len());
        for broadcast in broadcasts {
            let record = FanoutRecord {
                offset: next,
                id: broadcast.id,
                room: broadcast.room.clone(),
                plugin: plugin.to_owned(),
                payload: broadcast.payload.clone(),
                at_ms: now,
                event: broadcast.event.clone(),
            };
            table.insert(next, encode(&record).as_slice())?;
            records.push(record);
            next += 1;
        }
        meta.insert("fanout_next", next)?;
        self.trim_fanout(table, next, now)?;
        Ok(records)
    }

    /// Drop what is past retention (by count, then by age), a little at a time.
    fn trim_fanout(&self, table: &mut FanoutTable<'_>, next: u64, now: u64) -> Result<(), StoreError> {
        let by_count = next.saturating_sub(self.fanout_retention);
        let too_old = |value: &[u8]| {
            self.fanout_max_age_ms > 0
                && serde_json::from_slice::<FanoutRecord>(value).is_ok_and(|r| r.at_ms + self.fanout_max_age_ms < now)
        };
        let old: Vec<u64> = table
            .iter()?
            .take(1024)
            .map_while(|e| e.ok())
            .take_while(|(k, v)| k.value() < by_count || too_old(v.value()))
            .map(|(k, _)| k.value())
            .collect();
        for key in old {
            table.remove(key)?;
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
        let _order = self.lock_order();
        let window = self.fanout_retention;
        let mut txn = self.db.begin_write()?;
        // Not synced to disk on its own: a mirror is made again from the shared log. A crash
        // loses at most the records mirrored since the last durable commit (the next
        // runner commit makes them durable too), which are read and decided again, the
        // same way, from the stored position on.
        txn.set_durability(redb::Durability::None)?;
        let mut kept = Vec::with_capacity(records.len());
        {
            let mut table = txn.open_table(FANOUT)?;
            let mut ids = txn.open_table(FANOUT_IDS)?;
            let mut id_at = txn.open_table(FANOUT_ID_AT)?;
            let mut meta = txn.open_table(META)?;
            let mirrored = Store::meta(&meta, "fanout_next")?;
            for record in records.into_iter().filter(|r| r.offset >= mirrored) {
                let id = record.id.as_u128();
                let seen = ids.get(id)?.map(|v| v.value());
                if seen.is_some_and(|at| at + window > record.offset) {
                    continue;
                }
                if let Some(at) = seen {
                    id_at.remove(at)?;
                }
                ids.insert(id, record.offset)?;
                id_at.insert(record.offset, id)?;
                table.insert(record.offset, encode(&record).as_slice())?;
                kept.push(record);
            }
            let next = next.max(mirrored);
            meta.insert("fanout_next", next)?;
            // Ids older than the window are forgotten (a little at a time).
            let old: Vec<(u64, u128)> = id_at
                .range(..next.saturating_sub(window))?
                .take(4096)
                .map_while(|e| e.ok())
                .map(|(k, v)| (k.value(), v.value()))
                .collect();
            for (at, id) in old {
                id_at.remove(at)?;
                ids.remove(id)?;
            }
            self.trim_fanout(&mut table, next, crate::envelope::now_millis())?;
        }
        txn.commit()?;
        Ok(kept)
    }

    /// Start the fan-out table afresh as the mirror of a shared log of epoch `epoch`, from
    /// offset `from` (a host new to the log, or a log that was reset).
    pub fn reset_fanout(&self, epoch: u64, from: u64) -> Result<(), StoreError> {
        let _order = self.lock_order();
        let txn = self.db.begin_write()?;
        {
            txn.open_table(FANOUT)?.retain(|_, _| false)?;
            txn.open_table(FANOUT_IDS)?.retain(|_, _| false)?;
            txn.open_table(FANOUT_ID_AT)?.retain(|_, _| false)?;
            let mut meta = txn.open_table(META)?;
            meta.insert("epoch", epoch)?;
            meta.insert("fanout_next", from)?;
        }
        Ok(txn.commit()?)
    }

    /// Fan-out records with offset ≥ `from`, at most `max`; and the oldest offset retained.
    pub fn fanout_from(&self, from: u64, max: usize) -> Result<(Vec<FanoutRecord>, u64), StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(FANOUT)?;
        let oldest = match table.first()? {
            Some((k, _)) => k.value(),
            None => Store::meta(&txn.open_table(META)?, "fanout_next")?,
        };
        let mut out = Vec::new();
        for entry in table.range(from..)?.take(max) {
            let (_, value) = entry?;
            out.push(serde_json::from_slice(value.value())?);
        }
        Ok((out, oldest))
    }

    /// Fan-out records kept for resuming clients (also the window within which a repeated
    /// broadcast id in a shared fan-out log is a copy).
    pub fn fanout_window(&self) -> u64 {
        self.fanout_retention
    }

    /// How old a fan-out record may be, in ms (0: no limit).
    pub fn fanout_max_age_ms(&self) -> u64 {
        self.fanout_max_age_ms
    }

    /// The fan-out log's epoch: a new store (a reset log) has a new one.
    pub fn epoch(&self) -> Result<u64, StoreError> {
        Store::meta(&self.read()?.open_table(META)?, "epoch")
    }

    /// Fan-out records kept.
    pub fn fanout_len(&self) -> Result<u64, StoreError> {
        use redb::ReadableTableMetadata;
        Ok(self.read()?.open_table(FANOUT)?.len()?)
    }

    /// The offset the next broadcast will get.
    pub fn fanout_next(&self) -> Result<u64, StoreError> {
        Store::meta(&self.read()?.open_table(META)?, "fanout_next")
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
            event: "t.x".into(),
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
