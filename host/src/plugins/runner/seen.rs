//! The seen-id window: the ids of the events a runner applied last, so that a second copy
//! of one (Iggy can hold an event twice when a send is retried after a lost
//! acknowledgement) is skipped instead of applied twice. After a restart or a change of
//! positions the window is rebuilt from the log, a partition at a time, before that
//! partition is read again.

use std::collections::{HashSet, VecDeque};

use foldhash::fast::RandomState;

use super::log_access::LogAccess;
use super::offsets::{Offsets, TopicPartition};
use crate::envelope::Envelope;
use crate::log::LogError;

/// Event ids remembered; the oldest are forgotten first.
const SEEN_WINDOW: usize = 10_000;
/// Records read back per partition to rebuild the window: at least what one forwarding
/// round of a backend can send again after a crash.
const SEEN_PRIME: u64 = crate::log::REDELIVERY_WINDOW;

/// A set of event ids. Hashed with foldhash, seeded at random per process: an id is looked
/// up and inserted for every event a runner handles, and the standard SipHash was 6% of a
/// replay's time; the random seed keeps ids a publisher picks from colliding on purpose.
pub type IdSet = HashSet<u128, RandomState>;

pub struct SeenIds {
    ids: IdSet,
    /// The same ids, oldest first.
    order: VecDeque<u128>,
    capacity: usize,
    /// Partitions whose recent ids have been read back into the window.
    primed: HashSet<TopicPartition>,
}

impl Default for SeenIds {
    fn default() -> Self {
        SeenIds::with_capacity(SEEN_WINDOW)
    }
}

impl SeenIds {
    fn with_capacity(capacity: usize) -> Self {
        SeenIds { ids: IdSet::default(), order: VecDeque::new(), capacity, primed: HashSet::new() }
    }

    pub fn contains(&self, id: u128) -> bool {
        self.ids.contains(&id)
    }

    pub fn remember(&mut self, ids: impl IntoIterator<Item = u128>) {
        for id in ids {
            if self.ids.insert(id) {
                self.order.push_back(id);
                if self.order.len() > self.capacity
                    && let Some(old) = self.order.pop_front()
                {
                    self.ids.remove(&old);
                }
            }
        }
    }

    /// Forget every id; each partition's are read back before it is next polled.
    pub fn forget(&mut self) {
        self.ids.clear();
        self.order.clear();
        self.primed.clear();
    }

    /// Remember the ids of the records just before each position not primed yet, so that
    /// a copy of one of them further on is recognised. Fails (to be retried) while the log
    /// cannot be read: polling on without them could apply a redelivered event twice.
    pub fn prime(&mut self, log: &LogAccess, positions: &Offsets) -> Result<(), LogError> {
        let todo: Vec<(TopicPartition, u64)> = positions
            .iter()
            .filter(|(tp, _)| !self.primed.contains(*tp))
            .map(|(tp, next)| (tp.clone(), next))
            .collect();
        for (tp, next) in todo {
            // A poll may answer with fewer records than asked for (a remote log's page, or
            // what another reader just read): read on until `next`.
            let mut from = next.saturating_sub(SEEN_PRIME);
            while from < next {
                let want = usize::try_from(next - from).unwrap_or(usize::MAX);
                let records = log.poll(&tp, from, want)?;
                let Some(last) = records.last().map(|r| r.offset) else { break };
                let ids: Vec<u128> = records
                    .iter()
                    .filter(|r| r.offset < next)
                    .filter_map(|r| Envelope::from_bytes(&r.payload).ok().map(|e| e.event_id.as_u128()))
                    .collect();
                self.remember(ids);
                from = last + 1;
            }
            self.primed.insert(tp);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest_ids_first() {
        let mut seen = SeenIds::with_capacity(3);
        seen.remember([1, 2, 3]);
        seen.remember([2, 4]);
        assert!(!seen.contains(1));
        assert!([2, 3, 4].iter().all(|id| seen.contains(*id)));
        seen.forget();
        assert!(!seen.contains(4));
    }
}
