//! Takes what Iggy acknowledged out of the spool, off the forwarder's path. A lane hands
//! over the entries a round got acknowledged and starts its next round at once; one thread
//! writes the acknowledgements of every lane that queued up meanwhile in one durable
//! transaction. Measured on the Iggy path: a lane waited for its own acknowledgement's
//! fsync before its next send, and every such write queued with the publishes the spool
//! accepts (one write lock), so both an event's way to Iggy and a publish waited on it.
//!
//! Until written, acknowledged entries are in flight: a lane's peek skips them (none is
//! sent twice for this), and a lane that lost its connection waits for them (`flush`)
//! before it sends the recently acknowledged entries again. A write that fails
//! is tried again until it works, the entries in flight meanwhile.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, mpsc};

use tokio::sync::oneshot;

use super::spool::Spool;
use crate::log::{LogError, StorageError};

enum Request {
    /// Answered once written.
    Acknowledge(Vec<u64>, oneshot::Sender<()>),
    /// Answered once everything asked before it is written.
    Flush(oneshot::Sender<()>),
}

/// How long to wait before writing again after a write failed.
const RETRY: std::time::Duration = std::time::Duration::from_secs(1);

pub(super) struct Acker {
    in_flight: Arc<Mutex<HashSet<u64>>>,
    requests: mpsc::Sender<Request>,
    /// Written here directly if the thread is gone (it never should be): entries left in
    /// the spool would be sent again round after round.
    spool: Arc<Spool>,
}

impl Acker {
    /// Start the writer thread; it ends when the last `Acker` handle is dropped, after
    /// writing what was queued.
    pub(super) fn start(spool: Arc<Spool>) -> Result<Acker, LogError> {
        let (requests, queue) = mpsc::channel();
        let in_flight: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let (writing, written) = (in_flight.clone(), spool.clone());
        std::thread::Builder::new()
            .name("owlery-spool-acker".into())
            .spawn(move || write_loop(&written, &queue, &writing))
            .map_err(|source| StorageError::Thread { thread: "spool acker", source })?;
        Ok(Acker { in_flight, requests, spool })
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
        if let Err(mpsc::SendError(Request::Acknowledge(seqs, reply))) =
            self.requests.send(Request::Acknowledge(seqs, reply))
        {
            // No writer thread: written here (one durable write, on a path that should
            // never run); if even that fails they stay in the spool and are sent again.
            if let Err(error) = self.spool.acknowledged(&seqs) {
                tracing::error!(%error, "taking acknowledged entries out of the spool failed");
            }
            let mut in_flight = self.lock();
            for seq in &seqs {
                in_flight.remove(seq);
            }
            let _ = reply.send(());
        }
        written
    }

    /// The entries acknowledged and not yet out of the spool. Take this before reading
    /// the spool: an entry written out after that is no longer in what is read.
    pub(super) fn in_flight(&self) -> HashSet<u64> {
        self.lock().clone()
    }

    /// Wait until every acknowledgement handed over so far is written (or failed).
    pub(super) async fn flush(&self) {
        let (reply, done) = oneshot::channel();
        if self.requests.send(Request::Flush(reply)).is_ok() {
            let _ = done.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.in_flight.lock().expect("in-flight lock")
    }
}

fn write_loop(spool: &Spool, queue: &mpsc::Receiver<Request>, in_flight: &Mutex<HashSet<u64>>) {
    while let Ok(first) = queue.recv() {
        let mut seqs = Vec::new();
        let mut replies = Vec::new();
        for request in std::iter::once(first).chain(queue.try_iter()) {
            match request {
                Request::Acknowledge(more, reply) => {
                    seqs.extend(more);
                    replies.push(reply);
                }
                Request::Flush(reply) => replies.push(reply),
            }
        }
        // They are in Iggy: written out however long the spool fails (a full disk), and
        // in flight meanwhile, so that no lane sends them again and again.
        let mut failures = 0u32;
        while let Err(error) = spool.acknowledged(&seqs) {
            if failures == 0 {
                tracing::error!(%error, entries = seqs.len(), "taking acknowledged entries out of the spool failed; retrying");
            }
            failures += 1;
            std::thread::sleep(RETRY);
        }
        if failures > 0 {
            tracing::info!(failures, "acknowledged entries taken out of the spool");
        }
        {
            let mut in_flight = in_flight.lock().expect("in-flight lock");
            for seq in &seqs {
                in_flight.remove(seq);
            }
        }
        for reply in replies {
            let _ = reply.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;
    use crate::log::AppendItem;

    fn spool_with(dir: &std::path::Path, n: u64) -> Arc<Spool> {
        let spool = Arc::new(Spool::open(dir, 10).unwrap());
        let items: Vec<Vec<AppendItem>> = (0..n)
            .map(|i| {
                let envelope =
                    Envelope::from_producer(serde_json::json!({"eventType": "a.b", "data": {"n": i}})).unwrap();
                vec![AppendItem { topic: "t".into(), key: i.to_string(), envelope }]
            })
            .collect();
        spool.accept(&items, |_| 1, 1000).unwrap();
        spool
    }

    #[tokio::test]
    async fn acknowledged_entries_are_in_flight_until_written_then_out_of_the_spool_and_recent() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with(dir.path(), 5);
        let acker = Acker::start(spool.clone()).unwrap();
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

    #[tokio::test]
    async fn a_peek_never_returns_an_entry_in_flight_however_the_write_interleaves() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with(dir.path(), 200);
        let acker = Acker::start(spool.clone()).unwrap();
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
