//! Sends the spool to Iggy in order, forever: connects (and creates the stream and topics),
//! sends each partition's entries, removes what Iggy acknowledged, and after a lost
//! connection sends the last acknowledged entries again.
//!
//! One forwarder runs per connection to Iggy (a lane), each for the partitions that go over
//! its connection: a slow partition (Iggy's fsync of a big request) holds up only the
//! partitions of its lane, and a lane starts its next round as soon as its own is done.
//!
//! Nothing in the spool can stop it for good. Requests are capped in bytes as well as in
//! entries; an entry that cannot be read back is set aside at once; when Iggy refuses a
//! partition's head request `SPLIT_AFTER` times in a row for a reason that lies in the
//! messages (not a lost connection), that partition's entries go one by one and each one
//! still refused is set aside (logged, counted in the status, kept in the spool's `aside`
//! table). Each entry goes to its key's partition of as many as the topic has in Iggy, read
//! before any lane takes its entries (see `Remote::partition_in_iggy`): the host may have
//! accepted it with another count (before it could read the topic, or before another
//! client made the topic again). One key's events still share a partition.
//! Spool work runs on blocking threads; acknowledgements are handed to the `acker`, whose
//! entries the spool's writer thread writes with the next publishes.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use bytes::Bytes;
use iggy::prelude::IggyError;
use tokio::sync::watch;

use super::acker::Acker;
use super::client::{Remote, RemoteError};
use super::spool::{Destination, Spool, SpoolEntry};
use crate::log::{LogError, Unavailable};

/// Spool entries sent per round. A crash between Iggy's acknowledgement and the spool's
/// cleanup resends at most two rounds per partition (the one being sent, and the one
/// before whose acknowledgement the acker had not written yet); runners remember more ids
/// than that per partition (`log::REDELIVERY_WINDOW`), so the copies are recognised.
pub const FORWARD_BATCH: usize = 512;

/// Payload bytes per request at most (an entry bigger than this goes alone): a round of
/// entries near the publish body limit would otherwise be one request of a gigabyte.
const REQUEST_BYTES: usize = 4 << 20;

/// Refusals of one partition's head request in a row after which its entries go one by one.
const SPLIT_AFTER: u32 = 3;
/// The pause after a refused request before it is tried again.
const REFUSED_PAUSE: Duration = Duration::from_millis(200);
/// The pause before a topic whose partitions could not be read in Iggy is tried again.
const UNREAD_RETRY: Duration = Duration::from_secs(1);

/// Acknowledged entries sent again after the connection to Iggy was lost. Iggy 0.8.0 was
/// seen (kill -9 with every batch fsynced) to come back with the last message written
/// before the crash unreadable although it had acknowledged it; a copy sent again is read
/// instead, and runners skip the copies of what they already applied.
pub(super) const RESEND_AFTER_LOSS: u64 = FORWARD_BATCH as u64;

/// (topic, partition) → (spool sequence of the request Iggy refused, times in a row), shared
/// by the lanes.
pub(super) type Refusals = Arc<Mutex<HashMap<(String, u32), (u64, u32)>>>;

/// Spool entries of one (topic, partition), in order.
type PartitionGroup = ((String, u32), Vec<(u64, SpoolEntry)>);

pub(super) struct Forwarder {
    pub(super) remote: Arc<Remote>,
    pub(super) spool: Arc<Spool>,
    /// Which of the lanes (see `Remote::lane_of`) this one is.
    pub(super) lane: usize,
    /// Takes what Iggy acknowledged out of the spool, off this lane's path.
    pub(super) acker: Arc<Acker>,
    /// Answered when this lane's last round handed to the acker is written.
    pub(super) unwritten: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    /// Changes when something was spooled or a topic is wanted.
    pub(super) wake: watch::Receiver<u64>,
    /// Counted up when something reached Iggy, to wake the readers.
    pub(super) changes: watch::Sender<u64>,
    pub(super) refused: Refusals,
    /// Topics whose partitions could not be read in Iggy, and when to try again.
    pub(super) unreadable: HashMap<String, tokio::time::Instant>,
}

/// Why one request was not acknowledged.
enum Failure {
    /// Iggy (or the client, checking the messages) refused what was in it.
    Refused { head: u64, error: RemoteError },
    /// The topic's partitions changed under the host (another client made it again): its
    /// partitions were read again, and the next round sends to the ones it has now.
    Stale(RemoteError),
    /// Anything else: the connection, a time limit; sent again later as is.
    Down(RemoteError),
}

/// What became of one partition's entries in a round.
struct Outcome {
    topic: String,
    partition: u32,
    sent: Vec<u64>,
    failure: Option<Failure>,
}

/// Errors that lie in the messages sent, so that sending the same again is refused again.
pub(super) fn refusal(error: &IggyError) -> bool {
    use IggyError::*;
    matches!(
        error,
        InvalidMessagesCount
            | TooBigUserHeaders
            | InvalidHeaderKey
            | InvalidHeaderValue
            | TooBigMessagePayload
            | TooManyMessages
            | EmptyMessagePayload
            | InvalidMessagePayloadLength
            | InvalidMessageChecksum(..)
            | InvalidKeyValueLength
            | CommandLengthError(_)
            | InvalidMessagesSize(..)
            | TooSmallMessage(..)
            | InvalidMessageTimestampDelta(_)
            | InvalidBatchChecksum(..)
            | InvalidHeaderKind(_)
            | InvalidIndexesByteSize(_)
            | InvalidIndexesCount(..)
    )
}

/// The Iggy error behind a log error, if that is what it is.
pub(super) fn iggy_cause(error: &LogError) -> Option<&IggyError> {
    match error {
        LogError::Unavailable(u) => match u.as_ref() {
            Unavailable::Iggy(e) => Some(e),
            _ => None,
        },
        _ => None,
    }
}

/// What the forwarder knows of the connection between rounds.
struct Round {
    backoff: Duration,
    ready: bool,
    /// Connection losses whose recently acknowledged entries were sent again.
    resent_for: u64,
}

impl Forwarder {
    /// Forward until `stop`, which ends the lane between rounds only: a round Iggy may
    /// have taken always hands its acknowledgement over (written even with the log
    /// closed), so a log closed and opened again does not send it twice.
    pub(super) async fn run(mut self, stop: CancellationToken) {
        let mut round = Round { backoff: Duration::from_millis(100), ready: false, resent_for: 0 };
        loop {
            let entries = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                entries = self.next_round(&mut round) => entries,
            };
            let Some(entries) = entries else { continue };
            let pause = match self.send(entries, true).await {
                Ok(()) | Err(Failure::Stale(_)) => None,
                // Iggy is up and answering; the refused request is tried again (then split).
                Err(Failure::Refused { .. }) => Some(REFUSED_PAUSE),
                Err(Failure::Down(e)) => Some(self.down(&mut round, &e)),
            };
            if round.ready {
                self.changes.send_modify(|n| *n += 1);
            }
            if let Some(pause) = pause {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    /// Connect, resend after a loss, or wait for entries; the entries of the next round to
    /// send, if any (`None`: look again).
    async fn next_round(&mut self, round: &mut Round) -> Option<Vec<(u64, SpoolEntry)>> {
        {
            if !round.ready && !self.connect(round).await {
                return None;
            }
            let losses = self.remote.health.losses();
            if losses != round.resent_for {
                // What Iggy acknowledged last is in `recent` once its write is done.
                self.acker.flush().await;
                match self.spool_work(Spool::recent).await {
                    Ok(recent) => {
                        let unread = recent
                            .iter()
                            .filter(|(_, e)| self.remote.partitions_in_iggy(&e.topic).is_none())
                            .map(|(_, e)| e.topic.clone())
                            .collect();
                        self.read_topics(unread).await;
                        // Those of a topic that could not be read are not sent again: a
                        // best effort, like the resend itself.
                        let recent = recent.into_iter().filter(|(_, e)| self.mine(e)).collect();
                        self.resend(round, recent, losses).await;
                    }
                    Err(e) => self.spool_unreadable(&e).await,
                }
                return None;
            }
            // Marked seen before looking, so that what is spooled while looking wakes it.
            self.wake.borrow_and_update();
            let (remote, lane) = (self.remote.clone(), self.lane);
            // Acknowledged, on their way out of the spool: not to be sent again. Taken
            // before the spool is read (see `Acker::in_flight`).
            let in_flight = self.acker.in_flight();
            // Topics whose partitions in Iggy this host has not read yet (planned with the
            // settings' count, or not known at all after a restart): their entries wait until
            // they are read, so that every lane maps them to the same partitions, and a
            // partition's entries all go over one lane, in order.
            let unread: Arc<Mutex<BTreeSet<String>>> = Arc::default();
            let found = unread.clone();
            let mine = move |seq: u64, head: Option<Destination<'_>>| {
                !in_flight.contains(&seq)
                    && match head {
                        Some(to) => match remote.lane_of_entry(to.topic, to.partition, to.key_hash) {
                            Some(its) => its == lane,
                            None => {
                                found.lock().expect("unread lock").insert(to.topic.to_owned());
                                false
                            }
                        },
                        // Entries that cannot be read are set aside by one lane.
                        None => lane == 0,
                    }
            };
            let peeked = match self.spool_work(move |s| s.peek(FORWARD_BATCH, mine)).await {
                Ok(peeked) => peeked,
                Err(e) => {
                    self.spool_unreadable(&e).await;
                    return None;
                }
            };
            let unread = std::mem::take(&mut *unread.lock().expect("unread lock"));
            if self.read_topics(unread).await > 0 {
                // Look again, with their partitions known.
                return None;
            }
            let mut entries = Vec::with_capacity(peeked.len());
            let mut set_aside = false;
            for (seq, entry) in peeked {
                match entry {
                    Ok(entry) => entries.push((seq, entry)),
                    Err(reason) => set_aside |= self.set_aside(seq, reason).await,
                }
            }
            if set_aside && entries.is_empty() {
                return None;
            }
            if entries.is_empty() {
                tokio::select! {
                    _ = self.wake.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                return None;
            }
            Some(entries)
        }
    }

    /// Read (or make) the partitions in Iggy of `topics`; how many were read. One that
    /// cannot be (Iggy down or refusing it) is logged and tried again after
    /// `UNREAD_RETRY`: its entries wait, the other topics' go on.
    async fn read_topics(&mut self, topics: BTreeSet<String>) -> usize {
        let mut read = 0;
        for topic in topics {
            // Read by another lane since (maybe while this one looked): some of its entries
            // may have been taken and others skipped, so it counts as read, to look again.
            if self.remote.partitions_in_iggy(&topic).is_some() {
                read += 1;
                continue;
            }
            if self.unreadable.get(&topic).is_some_and(|after| tokio::time::Instant::now() < *after) {
                continue;
            }
            match self.remote.ensure_topic(&topic).await {
                Ok(()) => {
                    self.unreadable.remove(&topic);
                    read += 1;
                }
                Err(error) => {
                    tracing::warn!(%topic, %error, "cannot read the topic's partitions in Iggy; its events wait in the spool");
                    self.unreadable.insert(topic, tokio::time::Instant::now() + UNREAD_RETRY);
                }
            }
        }
        read
    }

    /// Whether `entry` goes over this lane's connection (not yet known while its topic's
    /// partitions in Iggy are not read).
    fn mine(&self, entry: &SpoolEntry) -> bool {
        self.remote.lane_of_entry(&entry.topic, entry.partition, entry.key_hash) == Some(self.lane)
    }

    /// Connect and prepare (lane 0 everything, the others their own connection); returns
    /// whether that worked (else it waited a backoff).
    async fn connect(&self, round: &mut Round) -> bool {
        if self.lane > 0 && !self.remote.health.connected() {
            // Lane 0 makes the stream and topics and finds Iggy up; until then, wait.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return false;
        }
        match self.remote.prepare_lane(self.lane).await {
            Ok(()) => {
                round.ready = true;
                round.backoff = Duration::from_millis(100);
                self.changes.send_modify(|n| *n += 1);
                true
            }
            Err(e) => {
                self.remote.health.failed(&e.to_string());
                tokio::time::sleep(round.backoff).await;
                round.backoff = (round.backoff * 2).min(Duration::from_secs(2));
                false
            }
        }
    }

    /// Send the recently acknowledged entries again, once per connection loss.
    async fn resend(&self, round: &mut Round, recent: Vec<(u64, SpoolEntry)>, losses: u64) {
        if !recent.is_empty() {
            tracing::info!(
                entries = recent.len(),
                "the connection to Iggy was lost: sending the last acknowledged events again \
                 (a crashed Iggy can come back without the last one it acknowledged)"
            );
        }
        match self.send(recent, false).await {
            Ok(()) | Err(Failure::Refused { .. } | Failure::Stale(_)) => round.resent_for = losses,
            Err(Failure::Down(e)) => tokio::time::sleep(self.down(round, &e)).await,
        }
    }

    /// The connection failed: say so and connect again; how long to wait first.
    fn down(&self, round: &mut Round, error: &RemoteError) -> Duration {
        self.remote.health.failed(&error.to_string());
        round.ready = false;
        round.backoff
    }

    async fn spool_unreadable(&self, error: &crate::log::LogError) {
        tracing::error!(%error, "reading the spool failed");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    /// Run spool work on a blocking thread: each write is a durable commit.
    async fn spool_work<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Spool) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || work(&spool)).await.expect("spool work does not panic")
    }

    /// Set entry `seq` aside; returns whether it was.
    async fn set_aside(&self, seq: u64, reason: String) -> bool {
        tracing::error!(entry = seq, %reason, "setting a spool entry aside (kept in the spool's aside table)");
        match self.spool_work(move |s| s.set_aside(seq, &reason)).await {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(%error, "setting a spool entry aside failed");
                false
            }
        }
    }

    /// Send spool entries partition by partition, in order; with `acknowledge`, what Iggy
    /// acknowledged is handed to the acker to leave the spool.
    async fn send(&self, entries: Vec<(u64, SpoolEntry)>, acknowledge: bool) -> Result<(), Failure> {
        let mut topics: Vec<&str> = entries.iter().map(|(_, e)| e.topic.as_str()).collect();
        topics.dedup();
        for topic in topics {
            if self.remote.partitions_in_iggy(topic).is_none() {
                self.remote.ensure_topic(topic).await.map_err(Failure::Down)?;
            }
        }
        let mut groups: Vec<PartitionGroup> = Vec::new();
        let mut moved = std::collections::BTreeSet::new();
        for (seq, mut entry) in entries {
            let partition = self.remote.partition_in_iggy(&entry.topic, entry.partition, entry.key_hash);
            if partition != entry.partition {
                let count = self.remote.partitions_in_iggy(&entry.topic).unwrap_or(1);
                moved.insert((entry.topic.clone(), entry.partition, partition, count));
                entry.partition = partition;
            }
            let key = (entry.topic.clone(), entry.partition);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, group)) => group.push((seq, entry)),
                None => groups.push((key, vec![(seq, entry)])),
            }
        }
        for (topic, accepted, to, count) in moved {
            tracing::warn!(
                %topic, partition = accepted, partitions = count,
                "events were accepted for this partition, planned with another count than the topic \
                 has in Iggy; sending them to their keys' partition {to}"
            );
        }
        // Partitions are independent: send to all of them at once, each in order.
        let sends = groups
            .into_iter()
            .map(|((topic, partition), group)| self.send_partition(topic, partition, group, acknowledge));
        let outcomes = futures_util::future::join_all(sends).await;
        // One durable write for what the whole round got acknowledged.
        let sent: Vec<u64> = outcomes.iter().flat_map(|o| o.sent.iter().copied()).collect();
        if !sent.is_empty() {
            if acknowledge {
                // Written by the acker while this lane goes on (and its readers are woken),
                // once the lane's previous round is: at most one round unwritten per lane.
                self.remote.health.forwarded(sent.len() as u64);
                let previous = self.unwritten.lock().expect("unwritten lock").take();
                if let Some(written) = previous {
                    let _ = written.await;
                }
                let written = self.acker.acknowledged(sent);
                *self.unwritten.lock().expect("unwritten lock") = Some(written);
            } else {
                self.remote.health.up();
            }
        }
        let mut first_error = None;
        for outcome in outcomes {
            match outcome.failure {
                None => {}
                Some(Failure::Refused { error, .. }) if !acknowledge => {
                    // Sent and acknowledged once already: nothing is lost by not resending.
                    tracing::warn!(%error, "Iggy refused an event it had acknowledged before; not sending it again");
                }
                Some(Failure::Refused { head, error }) => {
                    let mut refused = self.refused.lock().expect("refusals lock");
                    let entry = refused.entry((outcome.topic, outcome.partition)).or_insert((head, 0));
                    *entry = if entry.0 == head { (head, entry.1 + 1) } else { (head, 1) };
                    tracing::warn!(%error, times = entry.1, "Iggy refused a request");
                    first_error = first_error.or(Some(Failure::Refused { head, error }));
                }
                // A lost connection matters more than anything else: it is what the round reports.
                Some(failure) if !matches!(first_error, Some(Failure::Down(_))) => first_error = Some(failure),
                Some(_) => {}
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// One partition's entries, in requests of at most `FORWARD_BATCH` entries and
    /// `REQUEST_BYTES`; one by one (setting aside each refused) once its head request was
    /// refused `SPLIT_AFTER` times in a row.
    async fn send_partition(
        &self,
        topic: String,
        partition: u32,
        group: Vec<(u64, SpoolEntry)>,
        acknowledge: bool,
    ) -> Outcome {
        let head = group[0].0;
        let one_by_one = acknowledge
            && self
                .refused
                .lock()
                .expect("refusals lock")
                .get(&(topic.clone(), partition))
                .is_some_and(|r| r.0 == head && r.1 >= SPLIT_AFTER);
        let mut outcome = Outcome { topic: topic.clone(), partition, sent: Vec::new(), failure: None };
        let mut rest = group.as_slice();
        while !rest.is_empty() {
            let take = if one_by_one { 1 } else { request_len(rest) };
            let (request, after) = rest.split_at(take);
            rest = after;
            match self.send_request(&topic, partition, request).await {
                Ok(()) => outcome.sent.extend(request.iter().map(|(seq, _)| *seq)),
                Err(Failure::Refused { head, error }) if one_by_one => {
                    self.set_aside(head, format!("refused by Iggy {SPLIT_AFTER} times and alone: {error}")).await;
                }
                Err(failure) => {
                    outcome.failure = Some(failure);
                    break;
                }
            }
        }
        if one_by_one && outcome.failure.is_none() {
            self.refused.lock().expect("refusals lock").remove(&(topic, partition));
        }
        outcome
    }

    /// One request; `Ok` once Iggy acknowledged it.
    async fn send_request(&self, topic: &str, partition: u32, request: &[(u64, SpoolEntry)]) -> Result<(), Failure> {
        let head = request[0].0;
        let failed = |source: LogError| {
            let cause = iggy_cause(&source);
            let refused = cause.is_some_and(refusal);
            let stale = matches!(cause, Some(IggyError::PartitionNotFound(..) | IggyError::TopicIdNotFound(..)));
            let error = RemoteError::Send { topic: topic.to_owned(), partition, source };
            match (refused, stale) {
                (true, _) => Failure::Refused { head, error },
                (_, true) => Failure::Stale(error),
                _ => Failure::Down(error),
            }
        };
        // Not acknowledged in time counts as not sent: it stays in the spool and is sent
        // again (a copy that did arrive is skipped by the runners, by its eventId).
        let sender = self.remote.sender_for(topic, partition);
        let messages = request.iter().map(|(_, e)| (e.event_id, Bytes::from(e.payload.clone())));
        match self.remote.send_to(sender, topic, partition, messages).await.map_err(failed) {
            Ok(()) => Ok(()),
            Err(Failure::Stale(error)) => {
                tracing::warn!(%error, "reading the topic's partitions again");
                Err(match self.remote.ensure_topic(topic).await {
                    Ok(()) => Failure::Stale(error),
                    Err(e) => Failure::Down(e),
                })
            }
            Err(failure) => Err(failure),
        }
    }
}

/// How many of `entries` go in the next request: up to `FORWARD_BATCH` entries and
/// `REQUEST_BYTES` of payload, and at least one.
fn request_len(entries: &[(u64, SpoolEntry)]) -> usize {
    request_len_by(entries, |(_, entry)| entry.payload.len())
}

/// `request_len` of any entries, by `size` in payload bytes.
pub(super) fn request_len_by<T>(entries: &[T], size: impl Fn(&T) -> usize) -> usize {
    let mut bytes = 0;
    let mut take = 0;
    for entry in entries.iter().take(FORWARD_BATCH) {
        bytes += size(entry);
        if take > 0 && bytes > REQUEST_BYTES {
            break;
        }
        take += 1;
    }
    take
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(sizes: &[usize]) -> Vec<(u64, SpoolEntry)> {
        let entry = |size: usize| SpoolEntry {
            topic: "t".into(),
            partition: 0,
            event_id: 1,
            payload: "x".repeat(size),
            key_hash: None,
        };
        sizes.iter().enumerate().map(|(seq, size)| (seq as u64, entry(*size))).collect()
    }

    #[test]
    fn requests_are_split_by_bytes_and_entries_and_an_oversized_entry_goes_alone() {
        // A backlog of 1 MiB entries: four fit one request, the fifth starts the next.
        assert_eq!(request_len(&entries(&[1 << 20; 10])), 4);
        // An entry bigger than a whole request still goes, alone.
        assert_eq!(request_len(&entries(&[REQUEST_BYTES * 2, 10, 10])), 1);
        assert_eq!(request_len(&entries(&[10, REQUEST_BYTES * 2])), 1);
        // Small entries: capped by count.
        assert_eq!(request_len(&entries(&[10; FORWARD_BATCH + 5])), FORWARD_BATCH);
    }
}
