//! The outbox: entries committed with a batch (publishes, dead letters, broadcasts for a
//! shared fan-out log) that the outbox forwarder appends to the log in order.

use serde::{Deserialize, Serialize};

use super::{OUTBOX, Store, StoreError};
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

impl Store {
    /// The oldest `max` outbox entries, in order, with their sequence numbers.
    pub fn outbox_peek(&self, max: usize) -> Result<Vec<(u64, AppendItem)>, StoreError> {
        let table = self.read()?.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for entry in redb::ReadableTable::iter(&table)?.take(max) {
            let (seq, value) = entry?;
            let e: OutboxEntry = serde_json::from_slice(value.value())?;
            out.push((seq.value(), AppendItem { topic: e.topic, key: e.key, envelope: e.envelope }));
        }
        Ok(out)
    }

    /// Forget outbox entries up to and including `last` (they are in the log now).
    pub fn outbox_remove_through(&self, last: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(OUTBOX)?.retain_in(..=last, |_, _| false)?;
        Ok(txn.commit()?)
    }
}
