//! The outbox: entries committed with a batch (publishes, dead letters, broadcasts for a
//! shared fan-out log) that the outbox forwarder appends to the log in order.
//!
//! An entry that cannot be read back, or that the log refuses again and again, is set
//! aside (moved to its own table with the reason, kept for inspection) so that the entries
//! behind it still go out.

use serde::{Deserialize, Serialize};

use super::{OUTBOX, OUTBOX_ASIDE, Store, StoreError};
use crate::log::AppendItem;

/// An entry as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OutboxEntry {
    topic: String,
    key: String,
    envelope: crate::envelope::Envelope,
}

pub(super) fn encode(item: &AppendItem) -> Vec<u8> {
    let entry = OutboxEntry { topic: item.topic.clone(), key: item.key.clone(), envelope: item.envelope.clone() };
    serde_json::to_vec(&entry).expect("an outbox entry serialises")
}

/// One outbox entry: the item, or why it cannot be read back.
pub type Peeked = (u64, Result<AppendItem, String>);

impl Store {
    /// The oldest `max` outbox entries, in order, with their sequence numbers.
    pub fn outbox_peek(&self, max: usize) -> Result<Vec<Peeked>, StoreError> {
        let table = self.read()?.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for entry in redb::ReadableTable::iter(&table)?.take(max) {
            let (seq, value) = entry?;
            let item = serde_json::from_slice::<OutboxEntry>(value.value())
                .map(|e| AppendItem { topic: e.topic, key: e.key, envelope: e.envelope })
                .map_err(|e| format!("cannot be read back: {e}"));
            out.push((seq.value(), item));
        }
        Ok(out)
    }

    /// Forget outbox entries up to and including `last` (they are in the log now).
    pub fn outbox_remove_through(&self, last: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(OUTBOX)?.retain_in(..=last, |_, _| false)?;
        Ok(txn.commit()?)
    }

    /// Forget the one entry `seq` (it is in the log now).
    pub fn outbox_remove(&self, seq: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(OUTBOX)?.remove(seq)?;
        Ok(txn.commit()?)
    }

    /// Move entry `seq` out of the way, with `reason`; kept in the `outbox_aside` table.
    pub fn outbox_set_aside(&self, seq: u64, reason: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut outbox = txn.open_table(OUTBOX)?;
            let Some(bytes) = outbox.remove(seq)? else { return Ok(()) };
            let kept = serde_json::json!({
                "reason": reason,
                "at": crate::envelope::now_rfc3339(),
                "entry": String::from_utf8_lossy(bytes.value()),
            });
            txn.open_table(OUTBOX_ASIDE)?.insert(seq, serde_json::to_vec(&kept)?.as_slice())?;
        }
        Ok(txn.commit()?)
    }

    /// Entries waiting, and entries set aside.
    pub fn outbox_counts(&self) -> Result<(u64, u64), StoreError> {
        use redb::ReadableTableMetadata;
        let txn = self.read()?;
        Ok((txn.open_table(OUTBOX)?.len()?, txn.open_table(OUTBOX_ASIDE)?.len()?))
    }
}
