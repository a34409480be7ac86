//! The outbox forwarder: appends what plugins committed for the log (their publishes, dead
//! letters, and on a shared log their broadcasts) to the log in order (on a shared log, two
//! lanes: broadcasts, and the rest, each in order), then drops it from the store. A crash in
//! between appends the same entries again with the same ids: the embedded log accepts them
//! once; on Iggy, where they go straight to the server (`EventLog::forward`, not through the
//! spool), readers skip the copies by event id. After a lost connection to Iggy the last
//! entries it acknowledged are sent again (a crashed Iggy can lose them).
//!
//! Nothing in the outbox can stop it for good: an entry that cannot be read back is set
//! aside at once, and when the log refuses a round `SPLIT_AFTER` times in a row for a reason
//! about the entries themselves (see `is_refusal`), the round's entries are appended one by
//! one and each one still refused is set aside (logged, counted in the status, kept in the
//! store). A failure of the log's storage or connection (a full disk for a few seconds, Iggy
//! restarting) is not a refusal: it is retried, however long it lasts, and sets nothing
//! aside, since a good entry set aside is an output lost. Store work runs off the async
//! workers: it shares a lock with the runners' commits.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::log::{AppendItem, EventLog, LogError, StorageError, Unforwarded};
use crate::store::{Store, StoreError};

/// Entries appended per round.
const ROUND: usize = 256;
/// How long to wait before trying again after a failure, or looking again unwoken.
const RETRY: Duration = Duration::from_secs(1);
/// Refusals of one round in a row after which its entries are tried one by one.
const SPLIT_AFTER: u32 = 3;

/// Which entries a forwarding loop takes. On a shared log broadcasts have a loop of their
/// own: every broadcast is on its way to the clients, and it must not wait behind another
/// topic's send (measured on Iggy: the first write to each fresh partition of a plugin's
/// topic took 100-200 ms and held up every broadcast of the same round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Every entry (a local log).
    All,
    /// Broadcasts to the shared fan-out topic.
    Broadcasts,
    /// Everything else; this lane also sends the last entries again after a lost connection.
    Rest,
}

impl Lane {
    /// Whether an entry for `topic` (`None`: cannot be read) is this lane's.
    fn takes(self, topic: Option<&str>) -> bool {
        match self {
            Lane::All => true,
            Lane::Broadcasts => topic == Some(crate::fanout::FANOUT_TOPIC),
            Lane::Rest => topic != Some(crate::fanout::FANOUT_TOPIC),
        }
    }
}

/// Forward until `stop` is cancelled; `wake` is notified after each commit that adds entries.
pub async fn forward(store: Arc<Store>, log: Arc<dyn EventLog>, wake: Arc<Notify>, stop: CancellationToken) {
    let sending = Arc::new(tokio::sync::RwLock::new(()));
    if !log.is_shared() {
        return forward_lane(Lane::All, &store, log.as_ref(), &wake, &stop, sending).await;
    }
    let (broadcasts, rest) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    // Every commit wakes both lanes (a `Notify` wakes one waiter; a permit is kept for a
    // lane that is busy, so no wake-up is lost).
    let relay = async {
        loop {
            wake.notified().await;
            broadcasts.notify_one();
            rest.notify_one();
        }
    };
    tokio::select! {
        () = relay => {}
        () = forward_lane(Lane::Broadcasts, &store, log.as_ref(), &broadcasts, &stop, sending.clone()) => {}
        () = forward_lane(Lane::Rest, &store, log.as_ref(), &rest, &stop, sending) => {}
    }
}

async fn forward_lane(
    lane: Lane,
    store: &Arc<Store>,
    log: &dyn EventLog,
    wake: &Notify,
    stop: &CancellationToken,
    sending: Arc<tokio::sync::RwLock<()>>,
) {
    let mut progress = Progress { sending, ..Progress::default() };
    let mut resend = Resend::default();
    while !stop.is_cancelled() {
        let resent = match lane {
            Lane::Broadcasts => Ok(()),
            _ => resend_after_loss(store, log, &mut resend, &progress.sending).await,
        };
        let forwarded = match resent {
            Ok(()) => round(store, log, lane, &mut progress).await,
            Err(()) => Err(()),
        };
        let pause = match forwarded {
            Ok(true) => continue,
            Ok(false) => tokio::select! {
                _ = wake.notified() => continue,
                _ = tokio::time::sleep(RETRY) => continue,
                _ = stop.cancelled() => return,
            },
            Err(()) => RETRY,
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// What a lane knows between rounds.
#[derive(Default)]
struct Progress {
    refused: Refused,
    /// Where the next peek starts: every entry before it was sent, set aside, or is
    /// another lane's (so an idle lane does not read the other's backlog again each round).
    from: u64,
    /// Shared by the lanes: held (read) from a forward until its entries are cleared into
    /// the recent ones, and (write) while the recent ones are read to be sent again, so
    /// that no entry the log just acknowledged is missed by that.
    sending: Arc<tokio::sync::RwLock<()>>,
}

/// How often in a row the round starting at `head` was refused.
#[derive(Default)]
struct Refused {
    head: u64,
    times: u32,
}

/// Sending the recent entries again after a lost connection.
#[derive(Default)]
struct Resend {
    /// The count of losses they were last sent again for.
    resent_for: u64,
    /// Tries that failed while the log was connected, since the last that worked.
    failures: u32,
}

/// Run store work on a blocking thread.
async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    work: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || work(&store)).await.expect("outbox store work does not panic")
}

/// After each lost connection to a remote log, send the last entries it acknowledged
/// again, once: a crashed server can come back without the last ones (see
/// `EventLog::losses`). Readers skip the copies of what they already have, if the copies
/// come soon after (they remember a window of ids): so nothing new goes out before this
/// is done, and it is best effort. While the log is down it waits; after `SPLIT_AFTER`
/// tries that failed while it was connected it gives up, for every loss counted by then
/// (a failed try counts a loss of its own).
async fn resend_after_loss(
    store: &Arc<Store>,
    log: &dyn EventLog,
    resend: &mut Resend,
    sending: &tokio::sync::RwLock<()>,
) -> Result<(), ()> {
    let losses = log.losses();
    if losses == resend.resent_for {
        return Ok(());
    }
    // No lane between a forward and its clear: what the log acknowledged last is read.
    let _sending = sending.write().await;
    let recent = blocking(store, |s| s.outbox_recent())
        .await
        .map_err(|error| tracing::error!(%error, "reading the outbox's recent entries failed"))?;
    if !recent.is_empty() {
        tracing::info!(
            entries = recent.len(),
            "the connection to the log was lost: sending the outbox's last acknowledged entries again"
        );
        let connected = log.readiness().connected;
        match log.forward(recent).await {
            Ok(()) => {}
            // Acknowledged once already: nothing is lost by not sending them again.
            Err(Unforwarded { error, .. }) if is_refusal(&error) => {
                tracing::warn!(%error, "the log refused entries it had acknowledged before; not sending them again");
            }
            Err(Unforwarded { error, .. }) => {
                resend.failures += u32::from(connected);
                if resend.failures < SPLIT_AFTER {
                    tracing::debug!(%error, "sending the outbox's recent entries again failed; retrying");
                    return Err(());
                }
                tracing::warn!(%error, "sending the outbox's recent entries again failed {SPLIT_AFTER} times; going on without");
                *resend = Resend { resent_for: log.losses(), failures: 0 };
                return Ok(());
            }
        }
    }
    *resend = Resend { resent_for: losses, failures: 0 };
    Ok(())
}

/// One round of `lane`: `Ok(true)` when entries were forwarded or set aside, `Ok(false)`
/// when there were none.
async fn round(store: &Arc<Store>, log: &dyn EventLog, lane: Lane, progress: &mut Progress) -> Result<bool, ()> {
    let from = progress.from;
    let (entries, scanned_to) = blocking(store, move |s| s.outbox_peek(from, ROUND, |topic| lane.takes(topic)))
        .await
        .map_err(|error| tracing::error!(%error, "reading the outbox failed"))?;
    // Once this round's entries are gone, the next peek starts after them, or after all
    // that was looked at when that was less than a round.
    let next_from = match entries.last() {
        Some((last, _)) if entries.len() == ROUND => last + 1,
        _ => scanned_to.map_or(from, |seq| seq + 1),
    };
    if entries.is_empty() {
        progress.from = next_from;
        // Another lane's entries only: look on from there at once (the look stopped at
        // `SCAN` entries, or reached the end and the next one says so).
        return Ok(scanned_to.is_some());
    }
    let mut items = Vec::with_capacity(entries.len());
    let mut seqs = Vec::with_capacity(entries.len());
    for (seq, item) in entries {
        match item {
            Ok(item) => {
                seqs.push(seq);
                items.push(item);
            }
            Err(reason) => set_aside(store, seq, reason).await?,
        }
    }
    if items.is_empty() {
        progress.from = next_from;
        return Ok(true);
    }
    let head = seqs[0];
    let sending = progress.sending.clone();
    let _sending = sending.read().await;
    let refused = &mut progress.refused;
    if refused.head == head && refused.times >= SPLIT_AFTER {
        one_by_one(store, log, seqs.into_iter().zip(items).collect()).await?;
        progress.refused = Refused::default();
        progress.from = next_from;
        return Ok(true);
    }
    let keep_recent = log.is_shared();
    if let Err(Unforwarded { error, taken }) = log.forward(items).await {
        if is_refusal(&error) {
            refused.times = if refused.head == head { refused.times + 1 } else { 1 };
            refused.head = head;
        }
        tracing::warn!(%error, "forwarding the outbox to the log failed; retrying");
        // What the log took all the same is not sent again.
        let taken: Vec<u64> = taken.into_iter().filter_map(|i| seqs.get(i).copied()).collect();
        if !taken.is_empty() {
            let _ = clear(store, taken, keep_recent).await;
        }
        return Err(());
    }
    progress.refused = Refused::default();
    clear(store, seqs, keep_recent).await?;
    progress.from = next_from;
    Ok(true)
}

/// Forget entries the log took (see `Store::outbox_remove`).
async fn clear(store: &Arc<Store>, seqs: Vec<u64>, keep_recent: bool) -> Result<(), ()> {
    blocking(store, move |s| s.outbox_remove(&seqs, keep_recent))
        .await
        .map_err(|error| tracing::error!(%error, "clearing the outbox failed; sending its entries again later"))
}

/// Append a refused round's entries one at a time; set aside each the log still refuses
/// (on a failure that is not a refusal, stop and try again later).
async fn one_by_one(store: &Arc<Store>, log: &dyn EventLog, entries: Vec<(u64, AppendItem)>) -> Result<(), ()> {
    let keep_recent = log.is_shared();
    for (seq, item) in entries {
        match log.forward(vec![item]).await {
            Ok(()) => clear(store, vec![seq], keep_recent).await?,
            Err(Unforwarded { error, .. }) if !is_refusal(&error) => {
                tracing::warn!(%error, "forwarding the outbox to the log failed; retrying");
                return Err(());
            }
            Err(Unforwarded { error, .. }) => set_aside(store, seq, format!("refused by the log: {error}")).await?,
        }
    }
    Ok(())
}

/// Whether the log failed because of the entries appended (the same append would fail
/// again however long we wait), not because its storage or connection failed (which can
/// come back). Only these count towards setting entries aside. The match names every cause,
/// so that a new one has to be placed on one side or the other.
pub(crate) fn is_refusal(error: &LogError) -> bool {
    match error {
        LogError::Unavailable(_) => false,
        LogError::NoSuchTopic(_) | LogError::NoSuchPartition { .. } | LogError::Refused { .. } => true,
        LogError::Storage(cause) => match &**cause {
            // An entry the log cannot encode, a topic name it cannot take.
            StorageError::Entry(_) | StorageError::Name { .. } | StorageError::Topic { .. } => true,
            StorageError::Redb(redb::Error::ValueTooLarge(_)) => true,
            // A write error, a full disk, a thread that could not start, settings: the
            // host's, not the entry's.
            StorageError::Redb(_)
            | StorageError::Directory { .. }
            | StorageError::Thread { .. }
            | StorageError::Connection(_) => false,
            // The group commit answers every request in a failed group with its one error.
            StorageError::Group(inner) => is_refusal(inner),
        },
    }
}

async fn set_aside(store: &Arc<Store>, seq: u64, reason: String) -> Result<(), ()> {
    tracing::error!(entry = seq, %reason, "setting an outbox entry aside (kept in the store's outbox_aside table)");
    blocking(store, move |s| s.outbox_set_aside(seq, &reason))
        .await
        .map_err(|error| tracing::error!(%error, "setting an outbox entry aside failed"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::envelope::Envelope;
    use crate::log::Unavailable;
    use crate::log::embedded::EmbeddedLog;
    use crate::log::failing::Failing;
    use crate::store::BatchCommit;

    /// Refuses, every time, any append holding an entry for topic `refused` (neither real
    /// log refuses a single entry today; this is the defence for one that does).
    fn refusing(items: &[AppendItem]) -> Option<LogError> {
        items.iter().any(|i| i.topic == "refused").then(|| {
            let reason = "refused for the test".to_owned();
            StorageError::Topic { topic: "refused".into(), reason }.into()
        })
    }

    /// What the embedded log answers when its disk is full: a redb I/O error, through the
    /// group commit.
    fn disk_full() -> LogError {
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device (for the test)");
        let commit: LogError = StorageError::Redb(redb::Error::Io(io)).into();
        StorageError::Group(Arc::new(commit)).into()
    }

    /// A test log in `dir/log`, local or standing for a shared one.
    fn log_in<F>(dir: &std::path::Path, fail: F, shared: bool) -> Failing<F> {
        let log = EmbeddedLog::open(&dir.join("log"), 1).unwrap();
        if shared { Failing::shared(log, fail) } else { Failing::local(log, fail) }
    }

    fn item(topic: &str, n: u64) -> AppendItem {
        let envelope = Envelope::from_bytes(
            serde_json::json!({"eventId": uuid::Uuid::new_v4(), "eventType": "a.b", "timestamp": "2026-01-01T00:00:00Z",
                               "source": "t", "data": {"n": n}})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        AppendItem { topic: topic.into(), key: n.to_string(), envelope }
    }

    #[tokio::test]
    async fn an_entry_the_log_refuses_every_time_is_set_aside_and_the_rest_go_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 100, Duration::ZERO).unwrap());
        let log = log_in(dir.path(), refusing, false);
        let outbox = vec![item("out", 0), item("refused", 1), item("out", 2)];
        store.commit_batch("p", BatchCommit { outbox, ..BatchCommit::default() }, |_| {}).unwrap();

        let mut progress = Progress::default();
        for _ in 0..SPLIT_AFTER {
            assert!(round(&store, &log, Lane::All, &mut progress).await.is_err(), "the whole round is refused");
        }
        assert_eq!(store.outbox_counts().unwrap(), (3, 0), "nothing set aside yet");
        assert!(round(&store, &log, Lane::All, &mut progress).await.unwrap(), "then one by one");
        assert_eq!(store.outbox_counts().unwrap(), (0, 1), "only the refused one is set aside");
        let sent = log.poll("out", 0, 0, 10).await.unwrap();
        assert_eq!(sent.len(), 2, "the entries around it went out, in order");
    }

    #[tokio::test]
    async fn a_log_whose_storage_fails_for_a_while_gets_every_entry_and_sets_none_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 100, Duration::ZERO).unwrap());
        // More failures in a row than it takes to split a refused round.
        let failures = SPLIT_AFTER + 2;
        let left = AtomicU32::new(failures);
        let fail = move |_: &[AppendItem]| {
            let failing = left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
            failing.then(disk_full)
        };
        let log = log_in(dir.path(), fail, false);
        let outbox = vec![item("out", 0), item("out", 1), item("out", 2)];
        store.commit_batch("p", BatchCommit { outbox, ..BatchCommit::default() }, |_| {}).unwrap();

        let mut progress = Progress::default();
        for _ in 0..failures {
            assert!(
                round(&store, &log, Lane::All, &mut progress).await.is_err(),
                "the round fails while the disk is full"
            );
            assert_eq!(progress.refused.times, 0, "a storage failure is not a refusal");
        }
        assert_eq!(store.outbox_counts().unwrap(), (3, 0), "nothing set aside");
        assert!(round(&store, &log, Lane::All, &mut progress).await.unwrap(), "then the round goes out");
        assert_eq!(store.outbox_counts().unwrap(), (0, 0), "every entry went out, none set aside");
        let sent = log.poll("out", 0, 0, 10).await.unwrap();
        let ns: Vec<u64> =
            sent.iter().map(|r| Envelope::from_bytes(&r.payload).unwrap().data["n"].as_u64().unwrap()).collect();
        assert_eq!(ns, [0, 1, 2], "all of them, in order");
    }

    /// On a shared log a broadcast does not wait behind another topic's entries: with every
    /// append to topic `stuck` failing (a connection that does not answer), broadcasts still
    /// go out, and the stuck entry goes out once the log takes it.
    #[tokio::test]
    async fn on_a_shared_log_broadcasts_go_out_while_another_topic_is_stuck() {
        use std::sync::atomic::AtomicBool;

        use crate::fanout::FANOUT_TOPIC;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 100, Duration::ZERO).unwrap());
        let stuck = Arc::new(AtomicBool::new(true));
        let failing = stuck.clone();
        let fail = move |items: &[AppendItem]| {
            (failing.load(Ordering::Relaxed) && items.iter().any(|i| i.topic == "stuck"))
                .then(|| LogError::from(Unavailable::NoAnswer(Duration::from_secs(5))))
        };
        let log = log_in(dir.path(), fail, true);
        let outbox = vec![item("stuck", 0), item(FANOUT_TOPIC, 1), item(FANOUT_TOPIC, 2)];
        store.commit_batch("p", BatchCommit { outbox, ..BatchCommit::default() }, |_| {}).unwrap();

        let (mut rest, mut broadcasts) = (Progress::default(), Progress::default());
        assert!(round(&store, &log, Lane::Rest, &mut rest).await.is_err(), "the stuck topic fails");
        assert!(round(&store, &log, Lane::Broadcasts, &mut broadcasts).await.unwrap(), "broadcasts go out");
        assert_eq!(log.poll(FANOUT_TOPIC, 0, 0, 10).await.unwrap().len(), 2, "both broadcasts, ahead of it");
        assert_eq!(store.outbox_counts().unwrap(), (1, 0), "the stuck entry waits, nothing set aside");
        assert!(!round(&store, &log, Lane::Broadcasts, &mut broadcasts).await.unwrap(), "not the broadcasts' to send");
        stuck.store(false, Ordering::Relaxed);
        assert!(round(&store, &log, Lane::Rest, &mut rest).await.unwrap());
        assert_eq!(store.outbox_counts().unwrap(), (0, 0));
        assert_eq!(log.poll("stuck", 0, 0, 10).await.unwrap().len(), 1);
    }

    /// The whole forwarder on a shared log, as the host runs it: with one topic stuck behind
    /// a backlog longer than one look at the outbox, broadcasts committed after it still go
    /// out, woken by the commit.
    #[tokio::test(flavor = "multi_thread")]
    async fn broadcasts_behind_a_stuck_backlog_longer_than_one_scan_still_go_out() {
        use crate::fanout::FANOUT_TOPIC;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 100, Duration::ZERO).unwrap());
        let fail = |items: &[AppendItem]| {
            items
                .iter()
                .any(|i| i.topic == "stuck")
                .then(|| LogError::from(Unavailable::NoAnswer(Duration::from_secs(5))))
        };
        let log: Arc<dyn EventLog> = Arc::new(log_in(dir.path(), fail, true));
        log.ensure_topics(&[FANOUT_TOPIC.to_owned(), "stuck".to_owned()]).await.unwrap();
        let backlog: Vec<AppendItem> = (0..9000).map(|n| item("stuck", n)).collect();
        store.commit_batch("p", BatchCommit { outbox: backlog, ..BatchCommit::default() }, |_| {}).unwrap();
        let (wake, stop) = (Arc::new(Notify::new()), CancellationToken::new());
        let forwarder = tokio::spawn(forward(store.clone(), log.clone(), wake.clone(), stop.clone()));
        let broadcasts = vec![item(FANOUT_TOPIC, 1), item(FANOUT_TOPIC, 2)];
        store.commit_batch("p", BatchCommit { outbox: broadcasts, ..BatchCommit::default() }, |_| {}).unwrap();
        wake.notify_one();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        // Out when in the log and taken out of the outbox (just after; CI saw the gap).
        while log.poll(FANOUT_TOPIC, 0, 0, 10).await.unwrap().len() < 2 || store.outbox_counts().unwrap().0 > 9000 {
            assert!(std::time::Instant::now() < deadline, "the broadcasts never went out");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(store.outbox_counts().unwrap(), (9000, 0), "the stuck ones wait, none set aside");
        stop.cancel();
        forwarder.await.unwrap();
    }

    /// After each lost connection to a shared log, the last entries it acknowledged are sent
    /// again once (a crashed Iggy can come back without them); a local log keeps none.
    #[tokio::test]
    async fn after_a_lost_connection_the_last_acknowledged_entries_are_sent_again_once() {
        use std::sync::atomic::AtomicUsize;

        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 100, Duration::ZERO).unwrap());
        // Counts what is sent (the embedded log under it takes a repeated id once).
        let sent = Arc::new(AtomicUsize::new(0));
        let counting = sent.clone();
        let fail = move |items: &[AppendItem]| {
            counting.fetch_add(items.len(), Ordering::Relaxed);
            None
        };
        let log = log_in(dir.path(), fail, true);
        let outbox = vec![item("out", 0), item("out", 1)];
        store.commit_batch("p", BatchCommit { outbox, ..BatchCommit::default() }, |_| {}).unwrap();
        let mut progress = Progress::default();
        assert!(round(&store, &log, Lane::Rest, &mut progress).await.unwrap());
        assert_eq!(store.outbox_counts().unwrap(), (0, 0));
        assert_eq!(store.outbox_recent().unwrap().len(), 2, "kept after the log acknowledged them");
        assert_eq!(sent.load(Ordering::Relaxed), 2);

        let mut resend = Resend::default();
        resend_after_loss(&store, &log, &mut resend, &Default::default()).await.unwrap();
        assert_eq!(sent.load(Ordering::Relaxed), 2, "no loss, nothing sent again");
        log.losses.as_ref().unwrap().store(1, Ordering::Relaxed);
        resend_after_loss(&store, &log, &mut resend, &Default::default()).await.unwrap();
        assert_eq!(sent.load(Ordering::Relaxed), 4, "both sent again after the loss");
        resend_after_loss(&store, &log, &mut resend, &Default::default()).await.unwrap();
        assert_eq!(sent.load(Ordering::Relaxed), 4, "once per loss");

        // A local log keeps nothing to send again.
        let local = Failing::local(EmbeddedLog::open(&dir.path().join("local"), 1).unwrap(), |_: &[AppendItem]| None);
        let local_store = Arc::new(Store::open(&dir.path().join("local-store"), 100, Duration::ZERO).unwrap());
        let outbox = vec![item("out", 0)];
        local_store.commit_batch("p", BatchCommit { outbox, ..BatchCommit::default() }, |_| {}).unwrap();
        assert!(round(&local_store, &local, Lane::All, &mut Progress::default()).await.unwrap());
        assert!(local_store.outbox_recent().unwrap().is_empty());
    }

    /// A resend that keeps failing while the log is connected is given up after
    /// `SPLIT_AFTER` tries: new output must not wait behind it for good.
    #[tokio::test]
    async fn a_resend_that_keeps_failing_is_given_up_and_new_output_goes_on() {
        use std::sync::atomic::AtomicBool;

        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 100, Duration::ZERO).unwrap());
        let failing = Arc::new(AtomicBool::new(false));
        let fails = failing.clone();
        let fail = move |_: &[AppendItem]| {
            fails.load(Ordering::Relaxed).then(|| LogError::from(Unavailable::NoAnswer(Duration::from_secs(5))))
        };
        let log = log_in(dir.path(), fail, true);
        let outbox = vec![item("out", 0)];
        store.commit_batch("p", BatchCommit { outbox, ..BatchCommit::default() }, |_| {}).unwrap();
        assert!(round(&store, &log, Lane::Rest, &mut Progress::default()).await.unwrap());
        log.losses.as_ref().unwrap().store(1, Ordering::Relaxed);
        failing.store(true, Ordering::Relaxed);
        let (mut resend, sending) = (Resend::default(), tokio::sync::RwLock::new(()));
        for _ in 1..SPLIT_AFTER {
            assert!(resend_after_loss(&store, &log, &mut resend, &sending).await.is_err(), "tried again");
        }
        assert!(resend_after_loss(&store, &log, &mut resend, &sending).await.is_ok(), "then given up");
        assert_eq!(resend.resent_for, 1);
        assert!(resend_after_loss(&store, &log, &mut resend, &sending).await.is_ok(), "and not tried again");
    }

    #[test]
    fn only_failures_about_the_entries_are_refusals() {
        assert!(!is_refusal(&disk_full()));
        assert!(!is_refusal(&LogError::from(Unavailable::Closing)));
        assert!(is_refusal(&LogError::NoSuchTopic("gone".into())));
        let iggy_refused = LogError::from(Unavailable::from(iggy::prelude::IggyError::TooBigMessagePayload));
        assert!(is_refusal(&LogError::Refused { topic: "t".into(), partition: 0, source: Box::new(iggy_refused) }));
        assert!(is_refusal(&refusing(&[item("refused", 0)]).unwrap()));
    }
}
