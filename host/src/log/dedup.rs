//! Deduplication by `eventId`, inside an append's transaction: each id is remembered with
//! where its first copy went, and a repeat is answered with that place instead of being
//! written again. The embedded log remembers every id; the Iggy spool a window of recent ones.

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::{AppendItem, Appended, LogError};

/// eventId → (topic, partition, position) of its first copy
pub(super) type Ids = TableDefinition<'static, u128, (&'static str, u32, u64)>;
/// position → eventId, in the order they were placed, to forget the oldest
pub(super) type IdsByPosition = TableDefinition<'static, u64, u128>;

/// Ids forgotten per commit at most, so one commit never stalls on a large backlog.
const FORGET_PER_COMMIT: usize = 4096;

/// The ids already seen, open in one write transaction.
pub(super) struct SeenIds<'txn> {
    ids: Table<'txn, u128, (&'static str, u32, u64)>,
    /// With a window only.
    by_position: Option<Table<'txn, u64, u128>>,
}

impl<'txn> SeenIds<'txn> {
    /// Every id, forever.
    pub(super) fn all(txn: &'txn WriteTransaction, ids: Ids) -> Result<SeenIds<'txn>, LogError> {
        Ok(SeenIds { ids: txn.open_table(ids)?, by_position: None })
    }

    /// Ids placed recently: see `forget_before`.
    pub(super) fn windowed(
        txn: &'txn WriteTransaction,
        ids: Ids,
        by_position: IdsByPosition,
    ) -> Result<SeenIds<'txn>, LogError> {
        Ok(SeenIds { ids: txn.open_table(ids)?, by_position: Some(txn.open_table(by_position)?) })
    }

    /// Each item of each request, in order: a repeat answers its first copy; anything else
    /// `place` writes, returning its (partition, position). `positions_are_offsets` says
    /// whether a position is the record's offset in the log (else it is not known yet).
    pub(super) fn append_each(
        &mut self,
        group: &[Vec<AppendItem>],
        positions_are_offsets: bool,
        mut place: impl FnMut(&AppendItem) -> Result<(u32, u64), LogError>,
    ) -> Result<Vec<Vec<Appended>>, LogError> {
        let offset = |position| positions_are_offsets.then_some(position);
        let mut results = Vec::with_capacity(group.len());
        for items in group {
            let mut appended = Vec::with_capacity(items.len());
            for item in items {
                let event_id = item.envelope.event_id;
                let id = event_id.as_u128();
                if let Some(first) = self.ids.get(id)? {
                    let (topic, partition, position) = first.value();
                    let topic = topic.to_owned();
                    appended.push(Appended { event_id, topic, partition, offset: offset(position), duplicate: true });
                    continue;
                }
                let (partition, position) = place(item)?;
                self.ids.insert(id, (item.topic.as_str(), partition, position))?;
                if let Some(by_position) = &mut self.by_position {
                    by_position.insert(position, id)?;
                }
                let topic = item.topic.clone();
                appended.push(Appended { event_id, topic, partition, offset: offset(position), duplicate: false });
            }
            results.push(appended);
        }
        Ok(results)
    }

    /// Forget the ids placed before position `cut` (a bounded number per call).
    pub(super) fn forget_before(&mut self, cut: u64) -> Result<(), LogError> {
        let Some(by_position) = &mut self.by_position else { return Ok(()) };
        let old: Vec<(u64, u128)> = by_position
            .range(..cut)?
            .take(FORGET_PER_COMMIT)
            .filter_map(|e| e.ok().map(|(k, v)| (k.value(), v.value())))
            .collect();
        for (position, id) in old {
            by_position.remove(position)?;
            self.ids.remove(id)?;
        }
        Ok(())
    }
}
