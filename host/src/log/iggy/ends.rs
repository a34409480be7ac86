//! What is known of where each partition ends, so that a poll of a partition with nothing
//! new is answered without asking Iggy (a runner polls every partition of its topics each
//! time anything changes; on one connection those requests queue behind each other).

use std::collections::HashMap;

#[derive(Default)]
pub(super) struct Ends {
    /// (topic, partition) → (end as last read from Iggy if still known, generation)
    known: HashMap<(String, u32), (Option<u64>, u64)>,
}

impl Ends {
    /// Something was sent to the partition: its end is unknown until read again.
    pub(super) fn sent(&mut self, topic: &str, partition: u32) {
        let entry = self.known.entry((topic.to_owned(), partition)).or_insert((None, 0));
        *entry = (None, entry.1 + 1);
    }

    pub(super) fn generation(&self, topic: &str, partition: u32) -> u64 {
        self.known.get(&(topic.to_owned(), partition)).map_or(0, |e| e.1)
    }

    /// Record an end read from Iggy, unless the partition was sent to since `generation`.
    /// Returns whether it moved.
    pub(super) fn read(&mut self, topic: &str, partition: u32, end: u64, generation: u64) -> bool {
        let entry = self.known.entry((topic.to_owned(), partition)).or_insert((None, 0));
        if entry.1 != generation {
            return false;
        }
        let moved = entry.0 != Some(end);
        entry.0 = Some(end);
        moved
    }

    /// True when the partition is known to end at or before `from`.
    pub(super) fn nothing_from(&self, topic: &str, partition: u32, from: u64) -> bool {
        // Looking up by a borrowed pair would need another key type; this is a small map.
        self.known.iter().any(|((t, p), (end, _))| *p == partition && t == topic && end.is_some_and(|e| e <= from))
    }
}
