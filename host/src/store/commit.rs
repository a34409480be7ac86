//! A plugin batch's one transaction: its state writes, new offsets, broadcasts (into the
//! fan-out table, or to the outbox for a shared fan-out log) and outbox entries.

use std::collections::BTreeMap;

use super::fanout::FanoutRecord;
use super::{FANOUT, META, OFFSETS, STATE, Store, StoreError};
pub use crate::effects::Broadcast;
use crate::log::AppendItem;

/// Makes the log entry that carries a plugin's broadcast (committed at `at_ms`) to a shared
/// fan-out log: `(plugin, broadcast, at_ms)`.
pub type BroadcastEncoder = Box<dyn Fn(&str, &Broadcast, u64) -> AppendItem + Send + Sync>;

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

impl Store {
    /// Commit one plugin batch atomically, then hand its fan-out records (with their
    /// offsets) to `committed`; records of successive commits are handed on in order.
    pub fn commit_batch(
        &self,
        plugin: &str,
        batch: &BatchCommit,
        committed: impl FnOnce(Vec<FanoutRecord>),
    ) -> Result<(), StoreError> {
        let _order = self.lock_order();
        let txn = self.db.begin_write()?;
        let now = crate::envelope::now_millis();
        let mut fanout = Vec::new();
        {
            let mut state = txn.open_table(STATE)?;
            for (key, value) in &batch.state_writes {
                match value {
                    Some(v) => state.insert((plugin, key.as_str()), v.as_slice()).map(drop),
                    None => state.remove((plugin, key.as_str())).map(drop),
                }?;
            }
            let mut offsets = txn.open_table(OFFSETS)?;
            for (topic, partition, next) in &batch.offsets {
                offsets.insert((plugin, topic.as_str(), *partition), *next)?;
            }
            let mut meta = txn.open_table(META)?;
            let mut outbox: Vec<AppendItem> = Vec::new();
            match &self.shared {
                Some(encode) => outbox.extend(batch.broadcasts.iter().map(|b| encode(plugin, b, now))),
                None if !batch.broadcasts.is_empty() => {
                    let mut table = txn.open_table(FANOUT)?;
                    fanout = self.append_fanout(&mut table, &mut meta, plugin, &batch.broadcasts, now)?;
                }
                None => {}
            }
            if !batch.outbox.is_empty() || !outbox.is_empty() {
                super::outbox::push(&txn, &mut meta, &mut batch.outbox.iter().chain(&outbox))?;
            }
        }
        // Durable: syncs every outbox removal committed before it (see `outbox_remove`).
        let unsynced = self.unsynced_removals.swap(0, std::sync::atomic::Ordering::AcqRel);
        if let Err(error) = txn.commit() {
            self.unsynced_removals.fetch_add(unsynced, std::sync::atomic::Ordering::AcqRel);
            return Err(error.into());
        }
        committed(fanout);
        Ok(())
    }
}
