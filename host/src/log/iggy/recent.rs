//! The records last read from each partition of Iggy, kept so that readers at the same
//! place share one request. Every plugin's runner reads the same partitions of the same
//! topics, and each of its polls was a round trip to Iggy: with three plugins at 1,000
//! events/s the host made about 4,200 requests a second, most of them these polls, and Iggy
//! spent half a core answering them on a 2-core machine.
//!
//! A partition keeps one run of records: every record Iggy holds from `start` up to `end`
//! (one Iggy could not read is a gap). Readers at the end of the run take turns asking Iggy
//! for what follows (`Kept::fetching`); the others read what the first one brought. A
//! reader behind the run (replaying) asks Iggy itself and leaves the run as it is, so the
//! run follows the live readers.
//!
//! A record at an offset never changes while its topic lives, so the run stays true until
//! the topic is made again (the tailer notices; see `Recent::forget`) or Iggy loses
//! records in a crash (everything kept is dropped when Iggy fails to answer).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::log::Record;

/// Records kept per partition, at most: a few batches of the live readers.
const KEEP_RECORDS: usize = 512;
/// Payload bytes kept per partition, at most.
const KEEP_BYTES: usize = 256 << 10;

#[derive(Default)]
pub(super) struct Recent {
    /// topic → partition → its run
    topics: Mutex<HashMap<String, HashMap<u32, Arc<Kept>>>>,
}

impl Recent {
    fn topics(&self) -> MutexGuard<'_, HashMap<String, HashMap<u32, Arc<Kept>>>> {
        self.topics.lock().expect("recent lock")
    }

    pub(super) fn partition(&self, topic: &str, partition: u32) -> Arc<Kept> {
        let mut topics = self.topics();
        if !topics.contains_key(topic) {
            topics.insert(topic.to_owned(), HashMap::new());
        }
        let partitions = topics.get_mut(topic).expect("inserted above");
        partitions.entry(partition).or_default().clone()
    }

    /// Where the run kept of the partition ends, if one is kept. Read before asking Iggy
    /// where the partition ends: an answer below it means the topic was made again (Iggy's
    /// end only moves on; the run may grow past an answer read before it grew).
    pub(super) fn kept_end(&self, topic: &str, partition: u32) -> Option<u64> {
        let kept = self.topics().get(topic).and_then(|partitions| partitions.get(&partition).cloned())?;
        let run = kept.run();
        (!run.records.is_empty()).then_some(run.end)
    }

    /// Iggy said the partition ends at `end`, asked after the run ended at `kept_end`.
    pub(super) fn check_end(&self, topic: &str, kept_end: Option<u64>, end: u64) {
        if kept_end.is_some_and(|kept| kept > end) {
            self.forget(topic);
        }
    }

    /// The topic was made again (its offsets start over): nothing kept of it holds.
    pub(super) fn forget(&self, topic: &str) {
        if let Some(partitions) = self.topics().remove(topic) {
            partitions.values().for_each(|kept| kept.run().clear());
        }
    }

    /// Iggy failed to answer: after a crash it may hold other records at the offsets kept.
    pub(super) fn clear(&self) {
        for partitions in std::mem::take(&mut *self.topics()).into_values() {
            partitions.values().for_each(|kept| kept.run().clear());
        }
    }
}

/// One partition's run, and the turn to extend it.
#[derive(Default)]
pub(super) struct Kept {
    /// Held by the reader asking Iggy for what follows the run: the other readers at the
    /// end wait for it and read what it brought instead of asking too.
    pub(super) fetching: tokio::sync::Mutex<()>,
    run: Mutex<Run>,
}

#[derive(Default)]
struct Run {
    start: u64,
    end: u64,
    records: VecDeque<Record>,
    bytes: usize,
    /// When Iggy last answered that the partition ended at `end` (a read that came back
    /// with fewer records than it asked for).
    ended: Option<Instant>,
}

impl Run {
    fn clear(&mut self) {
        *self = Run::default();
    }
}

/// What a run held from an offset.
pub(super) struct Read {
    pub(super) records: Vec<Record>,
    /// All a reader asking Iggy now would get, as far as is known: `max` records, or the
    /// run's end, which Iggy said is the partition's end less than `FRESH` ago. Otherwise
    /// the reader asks Iggy for what follows, from `end`.
    pub(super) whole: bool,
    pub(super) end: u64,
}

/// How long Iggy's word that a partition ends at the run's end is taken: readers woken by
/// the same change come within this of each other, and one that comes later asks again
/// (so that a reader polling the same offset over and over sees new records).
const FRESH: Duration = Duration::from_millis(10);

impl Kept {
    fn run(&self) -> MutexGuard<'_, Run> {
        self.run.lock().expect("run lock")
    }

    /// Up to `max` records from `from`, if the run holds any.
    pub(super) fn read(&self, from: u64, max: usize) -> Option<Read> {
        let run = self.run();
        if from < run.start || from >= run.end {
            return None;
        }
        let first = run.records.partition_point(|r| r.offset < from);
        let records: Vec<Record> = run.records.range(first..).take(max).cloned().collect();
        if records.is_empty() {
            return None;
        }
        let whole = records.len() >= max || run.ended.is_some_and(|at| at.elapsed() < FRESH);
        Some(Read { records, whole, end: run.end })
    }

    /// Whether a read from `from` extends the run: then it takes its turn. While the run is
    /// empty (at the start, after a clear) no reader waits for another: a replay's long
    /// read must not hold up the live readers.
    pub(super) fn at_end(&self, from: u64) -> bool {
        let run = self.run();
        !run.records.is_empty() && from == run.end
    }

    /// Whether the run holds offsets at or past `end`: Iggy says the partition ends
    /// there, so it is not the partition the run was read from (made again, or records
    /// lost in a crash).
    pub(super) fn beyond(&self, end: u64) -> bool {
        let run = self.run();
        !run.records.is_empty() && run.end > end
    }

    /// `records` (in order, from `from` on) were read from Iggy, asking for `asked`: keep
    /// them if they extend the run or lie past it; a read behind the run changes nothing.
    pub(super) fn put(&self, from: u64, asked: usize, records: &[Record]) {
        let mut run = self.run();
        let Some(last) = records.last().map(|r| r.offset) else {
            // Nothing from the run's end: it is still the partition's end.
            if from == run.end && !run.records.is_empty() {
                run.ended = Some(Instant::now());
            }
            return;
        };
        if run.records.is_empty() || from > run.end {
            run.clear();
            run.start = from;
            run.end = from;
        } else if from < run.start {
            return;
        }
        let end = run.end;
        for record in records.iter().filter(|r| r.offset >= end) {
            run.bytes += record.payload.len();
            // A copy: Iggy's client slices each payload out of its whole answer, which a
            // shared slice would keep alive.
            let payload = bytes::Bytes::copy_from_slice(&record.payload);
            run.records.push_back(Record { partition: record.partition, offset: record.offset, payload });
        }
        if last + 1 >= run.end {
            run.end = last + 1;
            run.ended = (records.len() < asked).then(Instant::now);
        }
        while run.records.len() > KEEP_RECORDS || run.bytes > KEEP_BYTES {
            let Some(first) = run.records.pop_front() else { break };
            run.bytes -= first.payload.len();
            run.start = first.offset + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{FRESH, KEEP_RECORDS, Kept, Read, Recent};
    use crate::log::Record;

    fn records(offsets: impl IntoIterator<Item = u64>) -> Vec<Record> {
        offsets.into_iter().map(|offset| Record { partition: 0, offset, payload: vec![offset as u8].into() }).collect()
    }

    fn offsets(read: Option<Read>) -> Option<Vec<u64>> {
        read.map(|r| r.records.iter().map(|r| r.offset).collect())
    }

    #[test]
    fn a_run_serves_what_it_holds_and_grows_at_its_end() {
        let kept = Kept::default();
        assert!(!kept.at_end(7), "an empty run: nobody waits for another");
        kept.put(5, 3, &records([5, 6, 7]));
        assert_eq!(offsets(kept.read(6, 10)), Some(vec![6, 7]));
        assert_eq!(offsets(kept.read(5, 2)), Some(vec![5, 6]), "at most max");
        assert_eq!(kept.read(4, 10).map(|_| ()), None, "before the run: not known");
        assert_eq!(kept.read(8, 10).map(|_| ()), None, "the end: Iggy's to answer");
        assert!(kept.at_end(8) && !kept.at_end(6));
        assert!(kept.beyond(7) && !kept.beyond(8), "Iggy ending before the run's end: not this partition");
        // A read from inside the run that went on past its end: only the new ones are added.
        kept.put(7, 3, &records([7, 8, 9]));
        assert_eq!(offsets(kept.read(5, 10)), Some(vec![5, 6, 7, 8, 9]));
    }

    #[test]
    fn a_short_read_is_the_whole_answer_for_a_moment_then_iggy_is_asked_again() {
        let kept = Kept::default();
        kept.put(0, 3, &records(0..3));
        let read = kept.read(1, 10).unwrap();
        assert!(!read.whole && read.end == 3, "Iggy was asked for 3 and gave 3: there may be more");
        assert!(kept.read(1, 2).unwrap().whole, "max records is whole");
        kept.put(3, 10, &records(3..5));
        let read = kept.read(1, 10).unwrap();
        assert!(read.whole && read.end == 5, "Iggy gave fewer than asked: it ended at 5 just now");
        std::thread::sleep(FRESH + Duration::from_millis(5));
        assert!(!kept.read(1, 10).unwrap().whole, "later, Iggy is asked again from 5");
        kept.put(5, 10, &[]);
        assert!(kept.read(1, 10).unwrap().whole, "nothing from 5: it still ends there");
    }

    #[test]
    fn a_record_iggy_could_not_read_is_a_gap_not_an_end() {
        let kept = Kept::default();
        kept.put(0, 3, &records([0, 1, 3]));
        assert_eq!(offsets(kept.read(2, 10)), Some(vec![3]), "2 was skipped by the read");
        assert!(kept.at_end(4));
        kept.put(4, 10, &records([6]));
        assert_eq!(offsets(kept.read(4, 10)), Some(vec![6]), "the next read skipped 4 and 5");
    }

    #[test]
    fn a_read_behind_the_run_leaves_it_and_one_past_it_starts_a_new_one() {
        let kept = Kept::default();
        kept.put(100, 10, &records(100..110));
        kept.put(0, 10, &records(0..10));
        assert_eq!(kept.read(0, 10).map(|_| ()), None, "a replay does not displace the live run");
        assert_eq!(offsets(kept.read(105, 2)), Some(vec![105, 106]));
        kept.put(200, 10, &records(200..201));
        assert_eq!(kept.read(105, 2).map(|_| ()), None, "the run moved past a hole in what was read");
        assert_eq!(offsets(kept.read(200, 5)), Some(vec![200]));
    }

    #[test]
    fn a_run_keeps_a_bounded_number_of_records() {
        let kept = Kept::default();
        let total = KEEP_RECORDS as u64 + 10;
        for offset in 0..total {
            kept.put(offset, 1, &records([offset]));
        }
        assert_eq!(kept.read(9, 1).map(|_| ()), None, "the oldest went");
        assert_eq!(offsets(kept.read(10, 1)), Some(vec![10]));
        assert_eq!(kept.read(10, usize::MAX).map(|r| r.records.len()), Some(KEEP_RECORDS));
    }

    #[test]
    fn forgetting_a_topic_or_clearing_drops_what_was_kept() {
        let recent = Recent::default();
        let kept = recent.partition("t", 0);
        kept.put(0, 3, &records(0..3));
        recent.partition("u", 1).put(0, 3, &records(0..3));
        let kept_end = recent.kept_end("t", 0);
        assert_eq!(kept_end, Some(3));
        assert_eq!(recent.kept_end("t", 5), None);
        recent.check_end("t", kept_end, 3);
        assert!(kept.read(0, 10).is_some(), "Iggy ends where the run does: still the same topic");
        recent.check_end("t", kept_end, 2);
        assert!(kept.read(0, 10).is_none(), "a reader holding the old run sees it empty");
        assert!(recent.partition("t", 0).read(0, 10).is_none());
        assert!(recent.partition("u", 1).read(0, 10).is_some(), "other topics stay");
        recent.clear();
        assert!(recent.partition("u", 1).read(0, 10).is_none());
    }
}
