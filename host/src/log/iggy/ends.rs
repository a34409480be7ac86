//! What is known of where each partition ends, so that a poll of a partition with nothing
//! new is answered without asking Iggy (a runner polls every partition of its topics each
//! time anything changes; on one connection those requests queue behind each other).
//!
//! An end is learnt from the tailer's look at the topic, or from a poll that found nothing
//! at an offset; it is forgotten when this host sends to the partition. A generation
//! counted up by each send tells an end read before a send from one read after it.

use std::collections::HashMap;

#[derive(Default)]
pub(super) struct Ends {
    /// topic → partition → (end as last read from Iggy if still known, generation)
    known: HashMap<String, HashMap<u32, (Option<u64>, u64)>>,
}

impl Ends {
    fn entry(&mut self, topic: &str, partition: u32) -> &mut (Option<u64>, u64) {
        if !self.known.contains_key(topic) {
            self.known.insert(topic.to_owned(), HashMap::new());
        }
        let partitions = self.known.get_mut(topic).expect("inserted above");
        partitions.entry(partition).or_insert((None, 0))
    }

    fn get(&self, topic: &str, partition: u32) -> Option<&(Option<u64>, u64)> {
        self.known.get(topic)?.get(&partition)
    }

    /// Something was sent to the partition: its end is unknown until read again.
    pub(super) fn sent(&mut self, topic: &str, partition: u32) {
        let entry = self.entry(topic, partition);
        *entry = (None, entry.1 + 1);
    }

    pub(super) fn generation(&self, topic: &str, partition: u32) -> u64 {
        self.get(topic, partition).map_or(0, |e| e.1)
    }

    /// Record an end read from Iggy, unless the partition was sent to since `generation`.
    /// Returns whether it moved.
    pub(super) fn read(&mut self, topic: &str, partition: u32, end: u64, generation: u64) -> bool {
        let entry = self.entry(topic, partition);
        if entry.1 != generation {
            return false;
        }
        let moved = entry.0 != Some(end);
        entry.0 = Some(end);
        moved
    }

    /// Record an end learnt from a poll that found nothing at `end`, when none is known
    /// and the partition was not sent to since `generation`. A known end is never lowered
    /// by this: a poll's answer can arrive after the tailer read a later end.
    pub(super) fn learn(&mut self, topic: &str, partition: u32, end: u64, generation: u64) {
        let entry = self.entry(topic, partition);
        if entry.1 == generation && entry.0.is_none() {
            entry.0 = Some(end);
        }
    }

    /// True when the partition is known to end at or before `from`.
    pub(super) fn nothing_from(&self, topic: &str, partition: u32, from: u64) -> bool {
        self.get(topic, partition).is_some_and(|(end, _)| end.is_some_and(|e| e <= from))
    }
}

#[cfg(test)]
mod tests {
    use super::Ends;

    #[test]
    fn an_end_read_before_a_send_is_not_kept_and_one_read_after_it_is() {
        let mut ends = Ends::default();
        assert!(!ends.nothing_from("t", 0, 0), "nothing known yet");
        let before = ends.generation("t", 0);
        ends.sent("t", 0);
        // A poll that began before the send and found nothing says nothing of after it.
        assert!(!ends.read("t", 0, 0, before));
        assert!(!ends.nothing_from("t", 0, 0));
        let after = ends.generation("t", 0);
        assert!(ends.read("t", 0, 1, after), "the end moved to 1");
        assert!(ends.nothing_from("t", 0, 1) && !ends.nothing_from("t", 0, 0));
        assert!(!ends.nothing_from("t", 1, 5) && !ends.nothing_from("u", 0, 5), "other partitions and topics unknown");
        ends.sent("t", 0);
        assert!(!ends.nothing_from("t", 0, 1), "a send makes it unknown again");
    }

    #[test]
    fn a_poll_that_found_nothing_teaches_an_unknown_end_and_never_lowers_a_known_one() {
        let mut ends = Ends::default();
        let generation = ends.generation("t", 0);
        ends.learn("t", 0, 4, generation);
        assert!(ends.nothing_from("t", 0, 4), "learnt: polls from 4 need not ask Iggy");
        // The tailer read a later end; a poll's late answer must not take it back.
        assert!(ends.read("t", 0, 9, generation));
        ends.learn("t", 0, 4, generation);
        assert!(!ends.nothing_from("t", 0, 4), "still ends at 9");
        // A send since the poll began: what it found says nothing of now.
        let before = ends.generation("t", 1);
        ends.sent("t", 1);
        ends.learn("t", 1, 0, before);
        assert!(!ends.nothing_from("t", 1, 0));
    }
}
