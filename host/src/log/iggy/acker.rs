//! Takes what Iggy acknowledged out of the spool, off the forwarder's path, in the spool's
//! own group commits. A lane hands over the entries a round got acknowledged and starts
//! its next round at once; the spool's one writer thread (`SpoolWriter`) writes them in the
//! transaction of the next publishes it accepts (waiting `ACK_DELAY` at most for one, while
//! publishes come): one fsync for both. Measured on the Iggy path at 1,000 events/s: a writer of their own cost
//! 670 fsyncs and 6,000 page writes a second, and every publish queued behind its write
//! lock; the same writer without the wait still wrote most of them alone.
//!
//! Until written, acknowledged entries are in flight: a lane's peek skips them (none is
//! sent twice for this), and a lane that lost its connection waits for them (`flush`)
//! before it sends the recently acknowledged entries again. A write that fails
//! is tried again until it works, the entries in flight meanwhile.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::spool::Spool;
use crate::log::group_commit::{self, Append, GroupCommit, Writer};

/// What the spool's writer thread is asked.
pub(super) enum SpoolRequest {
    /// A publish: accepted into the spool.
    Append(Append),
    /// Iggy acknowledged these: out of the spool; answered once written.
    Acknowledge(Vec<u64>, oneshot::Sender<()>),
    /// Answered once everything asked before it is written.
    Flush(oneshot::Sender<()>),
}

impl From<Append> for SpoolRequest {
    fn from(append: Append) -> Self {
        SpoolRequest::Append(append)
    }
}

/// How long to wait before writing acknowledgements again after a write failed.
const RETRY: Duration = Duration::from_secs(1);

/// How long acknowledgements wait for publishes to share a transaction with. Less than a
/// round to Iggy takes under load (3 ms and more), so that a lane, which waits for its
/// previous round's write before handing over the next, seldom waits for this.
const ACK_DELAY: Duration = Duration::from_millis(2);

/// Publishes accepted within this long count as coming: acknowledgements wait for them.
const PUBLISHING: Duration = Duration::from_millis(20);

/// Acknowledgements written in one transaction at most; the rest go in the next ones.
/// Each moves an entry from the spool to the recently forwarded ones and drops the oldest
/// of those. Measured with 16 publishers on Iggy (one partition, whose rounds are the
/// largest): a write carrying 65-512 took 3 ms (median) to 10 ms, against 0.6 ms for the
/// others, and every publish queued behind it waited that long; publish p99 went from
/// 6.7-8.2 ms to 5.5-7.5.
const ACKS_PER_WRITE: usize = 64;

type InFlight = Arc<Mutex<HashSet<u64>>>;

/// The spool's writer: each group's publishes and acknowledgements in one transaction.
pub(super) struct SpoolWriter {
    spool: Arc<Spool>,
    /// How many partitions a topic has (or will get).
    partitions: Box<dyn Fn(&str) -> u32 + Send>,
    dedup_window: u64,
    /// Wakes the forwarder's lanes when something was spooled.
    forward: watch::Sender<u64>,
    in_flight: InFlight,
    /// Acknowledgements not written yet: more than one transaction takes (the rest go in
    /// the next ones), or whose write failed (in every later write until one works, and
    /// tried again after `RETRY` if nothing comes).
    unwritten: Vec<u64>,
    /// Acknowledgements handed over, and written, since the start: a reply waits until
    /// `written` reaches the count handed over with (or, for a flush, before) it; `waiting`
    /// is in the order handed over, so those counts never go down.
    handed: u64,
    written: u64,
    waiting: Vec<(u64, oneshot::Sender<()>)>,
    /// A flush waits until `written` reaches this: no acknowledgements wait for publishes
    /// meanwhile.
    flushing_until: u64,
    failures: u32,
    /// Since when acknowledgements have waited for publishes (see `ACK_DELAY`).
    deferred_since: Option<std::time::Instant>,
    /// When publishes were last accepted.
    last_accepted: Option<std::time::Instant>,
}

impl SpoolWriter {
    pub(super) fn new(
        spool: Arc<Spool>,
        partitions: impl Fn(&str) -> u32 + Send + 'static,
        dedup_window: u64,
        forward: watch::Sender<u64>,
    ) -> SpoolWriter {
        SpoolWriter {
            spool,
            partitions: Box::new(partitions),
            dedup_window,
            forward,
            in_flight: InFlight::default(),
            unwritten: Vec::new(),
            handed: 0,
            written: 0,
            waiting: Vec::new(),
            flushing_until: 0,
            failures: 0,
            deferred_since: None,
            last_accepted: None,
        }
    }

    /// The entries acknowledged and not written yet, shared with the `Acker`.
    pub(super) fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }
}

impl Writer<SpoolRequest> for SpoolWriter {
    fn write(&mut self, name: &'static str, group: Vec<SpoolRequest>) -> Option<Duration> {
        let mut items = Vec::new();
        let mut replies = Vec::new();
        for request in group {
            match request {
                SpoolRequest::Append(append) => {
                    items.push(append.items);
                    replies.push(append.reply);
                }
                SpoolRequest::Acknowledge(seqs, reply) => {
                    self.handed += seqs.len() as u64;
                    self.unwritten.extend(seqs);
                    self.waiting.push((self.handed, reply));
                }
                SpoolRequest::Flush(reply) => {
                    self.flushing_until = self.handed;
                    self.waiting.push((self.handed, reply));
                }
            }
        }
        let flush = self.written < self.flushing_until;
        // Acknowledgements alone wait a moment for publishes to ride with, while publishes
        // come (not while a backlog drains with none, nor after a failed write: that one
        // is tried again when due).
        let publishing = self.last_accepted.is_some_and(|at| at.elapsed() < PUBLISHING);
        if items.is_empty() && !flush && self.failures == 0 && !self.unwritten.is_empty() && publishing {
            let since = *self.deferred_since.get_or_insert_with(std::time::Instant::now);
            let left = ACK_DELAY.saturating_sub(since.elapsed());
            if !left.is_zero() {
                return Some(left);
            }
        }
        self.deferred_since = None;
        let acks = &self.unwritten[..self.unwritten.len().min(ACKS_PER_WRITE)];
        let (acknowledged, accepted) = match self.spool.write(&items, acks, &self.partitions, self.dedup_window) {
            Ok(results) => (Ok(()), Ok(results)),
            Err(error) if acks.is_empty() => (Ok(()), Err(error)),
            // Each part alone: neither fails for what the other touches.
            Err(error) if !items.is_empty() => {
                let accepted = self.spool.write(&items, &[], &self.partitions, self.dedup_window);
                let acknowledged = match accepted {
                    Ok(_) => Err(error),
                    Err(_) => self.spool.write(&[], acks, &self.partitions, self.dedup_window).map(drop),
                };
                (acknowledged, accepted)
            }
            Err(error) => (Err(error), Ok(Vec::new())),
        };
        let written = acks.len();
        match &acknowledged {
            // Iggy has them: written out however long the spool fails (a full disk), and
            // in flight meanwhile, so that no lane sends them again and again.
            Err(error) => {
                if self.failures == 0 {
                    tracing::error!(%error, entries = self.unwritten.len(), "taking acknowledged entries out of the spool failed; retrying");
                }
                self.failures += 1;
            }
            _ => {
                if self.failures > 0 {
                    tracing::info!(failures = self.failures, "acknowledged entries taken out of the spool");
                    self.failures = 0;
                }
                let mut in_flight = self.in_flight.lock().expect("in-flight lock");
                for seq in self.unwritten.drain(..written) {
                    in_flight.remove(&seq);
                }
                drop(in_flight);
                // Each round is answered once it is written (a flush: all before it), not
                // after the other lanes' rounds behind it.
                self.written += written as u64;
                // In the order handed over, so by the count each waits for.
                let done = self.waiting.partition_point(|(until, _)| *until <= self.written);
                for (_, reply) in self.waiting.drain(..done) {
                    let _ = reply.send(());
                }
            }
        }
        if !replies.is_empty() {
            if accepted.is_ok() {
                self.last_accepted = Some(std::time::Instant::now());
                self.forward.send_modify(|n| *n += 1);
            }
            group_commit::answer(name, replies, accepted);
        }
        match (self.unwritten.is_empty(), self.failures) {
            (true, _) => None,
            // More than one transaction's worth: the rest next (riding with publishes).
            (false, 0) => Some(Duration::ZERO),
            (false, _) => Some(RETRY),
        }
    }

    /// The log is closing: what is still unwritten is written now (until a write fails).
    fn finish(&mut self, name: &'static str) {
        while !self.unwritten.is_empty() || !self.waiting.is_empty() {
            let (reply, _) = oneshot::channel();
            let failures = self.failures;
            self.write(name, vec![SpoolRequest::Flush(reply)]);
            if self.failures > failures {
                break;
            }
        }
    }
}

pub(super) struct Acker {
    in_flight: InFlight,
    /// The spool's writer; not kept alive by the acker (the log owns it and stops it).
    writer: Weak<GroupCommit<SpoolRequest>>,
    /// Written here directly if the writer is gone (a lane ending its last round after the
    /// log closed): entries left in the spool would be sent again after a reopen.
    spool: Arc<Spool>,
}

impl Acker {
    pub(super) fn new(in_flight: &InFlight, writer: &Arc<GroupCommit<SpoolRequest>>, spool: Arc<Spool>) -> Acker {
        Acker { in_flight: in_flight.clone(), writer: Arc::downgrade(writer), spool }
    }

    /// Iggy acknowledged these spool entries: they leave the spool soon. Answers once they
    /// are written: a lane waits for that before it hands over its next round, so at most
    /// one round per lane is acknowledged and not written (a host that crashes then sends
    /// at most that round again, within what readers recognise as copies).
    pub(super) fn acknowledged(&self, seqs: Vec<u64>) -> oneshot::Receiver<()> {
        let (reply, written) = oneshot::channel();
        if seqs.is_empty() {
            let _ = reply.send(());
            return written;
        }
        self.lock().extend(seqs.iter().copied());
        let request = SpoolRequest::Acknowledge(seqs, reply);
        let unqueued = match self.writer.upgrade() {
            Some(writer) => writer.try_send(request),
            None => Err(request),
        };
        if let Err(SpoolRequest::Acknowledge(seqs, reply)) = unqueued {
            self.write_here(&seqs);
            let _ = reply.send(());
        }
        written
    }

    /// No writer thread (the log closed): written here, one durable write; if even that
    /// fails they stay in the spool and are sent again.
    fn write_here(&self, seqs: &[u64]) {
        if let Err(error) = self.spool.acknowledged(seqs) {
            tracing::error!(%error, "taking acknowledged entries out of the spool failed");
        }
        let mut in_flight = self.lock();
        for seq in seqs {
            in_flight.remove(seq);
        }
    }

    /// The entries acknowledged and not yet out of the spool. Take this before reading
    /// the spool: an entry written out after that is no longer in what is read.
    pub(super) fn in_flight(&self) -> HashSet<u64> {
        self.lock().clone()
    }

    /// Wait until every acknowledgement handed over so far is written (a failed write is
    /// tried again until it works).
    pub(super) async fn flush(&self) {
        let (reply, done) = oneshot::channel();
        let sent = self.writer.upgrade().is_some_and(|writer| writer.send(SpoolRequest::Flush(reply)).is_ok());
        if sent {
            let _ = done.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.in_flight.lock().expect("in-flight lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;
    use crate::log::AppendItem;

    fn items(from: u64, n: u64) -> Vec<Vec<AppendItem>> {
        (from..from + n)
            .map(|i| {
                let envelope =
                    Envelope::from_producer(serde_json::json!({"eventType": "a.b", "data": {"n": i}})).unwrap();
                vec![AppendItem { topic: "t".into(), key: i.to_string(), envelope }]
            })
            .collect()
    }

    fn spool_with(dir: &std::path::Path, n: u64) -> Arc<Spool> {
        let spool = Arc::new(Spool::open(dir, 10).unwrap());
        spool.accept(&items(0, n), |_| 1, 1000).unwrap();
        spool
    }

    /// The spool's writer thread, as the log starts it, and an acker on it.
    fn writer_for(spool: &Arc<Spool>) -> (Arc<GroupCommit<SpoolRequest>>, Acker) {
        let writer = SpoolWriter::new(spool.clone(), |_| 1, 1000, watch::channel(0).0);
        let in_flight = writer.in_flight().clone();
        let writer = Arc::new(GroupCommit::start("spool writer", writer).unwrap());
        let acker = Acker::new(&in_flight, &writer, spool.clone());
        (writer, acker)
    }

    #[tokio::test]
    async fn acknowledged_entries_are_in_flight_until_written_then_out_of_the_spool_and_recent() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with(dir.path(), 5);
        let (_writer, acker) = writer_for(&spool);
        let written = acker.acknowledged(vec![0, 1, 2]);
        // Either still in flight or already written: never both gone and still in the spool.
        let in_flight = acker.in_flight();
        let pending: Vec<u64> =
            spool.peek(10, |seq, _| !in_flight.contains(&seq)).unwrap().iter().map(|p| p.0).collect();
        assert_eq!(pending, [3, 4]);
        written.await.unwrap();
        assert!(acker.in_flight().is_empty(), "written out");
        assert_eq!(spool.depth(), 2);
        let recent: Vec<u64> = spool.recent().unwrap().iter().map(|(seq, _)| *seq).collect();
        assert_eq!(recent, [0, 1, 2], "kept to be sent again after a lost connection");
    }

    /// Rounds handed over together are each answered once their own acknowledgements are
    /// written, not after the ones behind them; a flush (answered once all before it are)
    /// does not let the rest wait for publishes.
    #[test]
    fn each_round_is_answered_once_its_own_acknowledgements_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with(dir.path(), 300);
        let mut writer = SpoolWriter::new(spool.clone(), |_| 1, 1000, watch::channel(0).0);
        let (small, mut small_written) = oneshot::channel();
        let (large, mut large_written) = oneshot::channel();
        let (flush, mut flushed) = oneshot::channel();
        let left = writer.write(
            "spool writer",
            vec![
                SpoolRequest::Acknowledge((0..10).collect(), small),
                SpoolRequest::Acknowledge((10..210).collect(), large),
                SpoolRequest::Flush(flush),
            ],
        );
        assert!(small_written.try_recv().is_ok(), "the first round fit the first write");
        assert!(large_written.try_recv().is_err() && flushed.try_recv().is_err());
        assert_eq!(left, Some(Duration::ZERO), "the rest right after");
        // Publishes coming: acknowledgements alone would wait for them, but not while a
        // flush waits.
        writer.last_accepted = Some(std::time::Instant::now());
        let mut writes = 1;
        while !writer.unwritten.is_empty() {
            let before = writer.unwritten.len();
            writer.write("spool writer", Vec::new());
            assert!(writer.unwritten.len() < before, "a write with each call");
            writes += 1;
        }
        assert_eq!(writes, 210_usize.div_ceil(ACKS_PER_WRITE));
        assert!(large_written.try_recv().is_ok() && flushed.try_recv().is_ok());
        assert_eq!(spool.depth(), 90);
    }

    /// A round of more acknowledgements than one transaction takes is written over
    /// several, and answered once all of it is out of the spool; one still unwritten when
    /// the log closes is written before the writer ends.
    #[tokio::test]
    async fn a_round_larger_than_one_write_is_answered_once_all_of_it_is_out_of_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with(dir.path(), 300);
        let (writer, acker) = writer_for(&spool);
        const { assert!(200 > ACKS_PER_WRITE) };
        acker.acknowledged((0..200).collect()).await.unwrap();
        assert!(acker.in_flight().is_empty());
        assert_eq!(spool.depth(), 100, "all 200 out when answered");
        let recent: Vec<u64> = spool.recent().unwrap().iter().map(|(seq, _)| *seq).collect();
        assert_eq!(recent, (190..200).collect::<Vec<_>>(), "the last ten kept");
        let _unanswered = acker.acknowledged((200..300).collect());
        drop(writer);
        assert_eq!(spool.depth(), 0, "written out before the writer ended");
    }

    #[tokio::test]
    async fn acknowledgements_and_publishes_share_the_writer_in_the_order_they_came() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with(dir.path(), 4);
        let (writer, acker) = writer_for(&spool);
        // Handed over before a publish: written by the time the publish is answered,
        // whether in its transaction or an earlier one.
        let written = acker.acknowledged(vec![0, 1]);
        let publish = items(4, 1).remove(0);
        let accepted = writer.append(publish.clone()).await.unwrap();
        assert!(!accepted[0].duplicate);
        assert!(acker.in_flight().is_empty());
        assert_eq!(spool.depth(), 3, "two out, one in");
        written.await.unwrap();
        // The same publish again: the dedup window knows it, so nothing is spooled twice.
        let again = writer.append(publish).await.unwrap();
        assert!(again[0].duplicate);
        assert_eq!(spool.depth(), 3);
        acker.acknowledged(vec![2, 3, 4]);
        acker.flush().await;
        assert_eq!(spool.depth(), 0);
    }

    #[tokio::test]
    async fn with_the_writer_gone_acknowledgements_are_written_directly() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with(dir.path(), 3);
        let (writer, acker) = writer_for(&spool);
        drop(writer);
        acker.acknowledged(vec![0, 2]).await.unwrap();
        assert!(acker.in_flight().is_empty());
        assert_eq!(spool.depth(), 1);
        acker.flush().await;
    }

    #[tokio::test]
    async fn a_peek_never_returns_an_entry_in_flight_however_the_write_interleaves() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with(dir.path(), 200);
        let (_writer, acker) = writer_for(&spool);
        for seq in 0..200u64 {
            let _written = acker.acknowledged(vec![seq]);
            // Taken before reading, as the forwarder does: an entry acknowledged so far is
            // either in the set or no longer in the spool.
            let in_flight = acker.in_flight();
            let peeked = spool.peek(500, |s, _| !in_flight.contains(&s)).unwrap();
            assert!(peeked.iter().all(|(s, _)| *s > seq), "entry {seq} would be sent twice");
        }
        acker.flush().await;
        assert_eq!(spool.depth(), 0);
    }
}
