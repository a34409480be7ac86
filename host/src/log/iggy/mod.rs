//! The Apache Iggy backend: the same `EventLog` contract on an Iggy server over TCP.
//!
//! Every accepted publish is first written to a durable local spool (`spool`), and a
//! forwarder (`forwarder`) sends the spool to Iggy in order, removing what Iggy
//! acknowledged. So `POST /api/events` keeps answering while Iggy is down, and nothing
//! accepted is lost: it is forwarded when Iggy is back. A resend after a lost
//! acknowledgement can put an event in Iggy twice; runners skip an `eventId` they have
//! already applied. Other clients' writes are noticed by the `tailer`.

mod acker;
mod client;
mod consumer_offsets;
mod direct;
mod ends;
mod forwarder;
mod health;
mod poll;
mod recent;
mod settings;
mod spool;
mod status;
mod tailer;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use iggy::prelude::StreamClient;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::acker::{Acker, SpoolRequest, SpoolWriter};
use self::client::{REQUEST_TIMEOUT, Remote, SEND_CONNECTIONS, answered};
use self::consumer_offsets::ConsumerOffsets;
pub use self::forwarder::FORWARD_BATCH;
use self::forwarder::{Forwarder, RESEND_AFTER_LOSS};
pub use self::settings::IggySettings;
use self::spool::Spool;
use super::group_commit::GroupCommit;
use super::{AppendItem, Appended, EventLog, LogError, Record, Unforwarded};

pub struct IggyLog {
    remote: Arc<Remote>,
    spool: Arc<Spool>,
    /// Wakes the forwarder's lanes: something was spooled, or a topic is wanted.
    forward: watch::Sender<u64>,
    /// Counted up by what wakes the readers; kept so `changes` stays open while the
    /// background tasks are replaced or gone.
    changes_tx: watch::Sender<u64>,
    changes: watch::Receiver<u64>,
    consumer_offsets: Arc<ConsumerOffsets>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Ends the forwarder's lanes, each between two rounds (see `Forwarder::run`).
    stop_lanes: CancellationToken,
    /// The spool's one writer: publishes and acknowledgements (the acker holds it weakly,
    /// so dropping the log stops it).
    writer: Arc<GroupCommit<SpoolRequest>>,
}

impl IggyLog {
    /// Open the spool in `dir` and start connecting to Iggy in the background; the host
    /// starts (and accepts publishes) whether or not Iggy is up.
    pub fn open(dir: &Path, settings: IggySettings) -> Result<IggyLog, LogError> {
        let spool = Arc::new(Spool::open(dir, RESEND_AFTER_LOSS)?);
        let remote = Arc::new(Remote::new(settings)?);
        let (changes_tx, changes) = watch::channel(0);
        let (forward, _) = watch::channel(0u64);
        let planner = remote.clone();
        let writer = SpoolWriter::new(
            spool.clone(),
            move |topic| planner.plan_topic(topic),
            remote.settings.dedup_window,
            forward.clone(),
        );
        let in_flight = writer.in_flight().clone();
        let writer = Arc::new(GroupCommit::start("spool writer", writer)?);
        let consumer_offsets = Arc::new(ConsumerOffsets::default());
        let refused = Arc::default();
        let acker = Arc::new(Acker::new(&in_flight, &writer, spool.clone()));
        let stop_lanes = CancellationToken::new();
        (0..SEND_CONNECTIONS)
            .map(|lane| {
                let forwarder = Forwarder {
                    remote: remote.clone(),
                    spool: spool.clone(),
                    lane,
                    acker: acker.clone(),
                    unwritten: Default::default(),
                    wake: forward.subscribe(),
                    changes: changes_tx.clone(),
                    refused: Arc::clone(&refused),
                    unreadable: Default::default(),
                };
                tokio::spawn(forwarder.run(stop_lanes.clone()))
            })
            .for_each(drop);
        let tasks = vec![
            tokio::spawn(tailer::run(remote.clone(), changes_tx.clone())),
            tokio::spawn(consumer_offsets::record(remote.clone(), consumer_offsets.clone())),
        ];
        Ok(IggyLog { remote, spool, forward, changes_tx, changes, consumer_offsets, tasks, stop_lanes, writer })
    }
}

impl Drop for IggyLog {
    /// Stop the background tasks (the lanes after the round they are in, each of its
    /// requests bounded by the request timeout); then the writer (a field) finishes what
    /// is queued. A lane that finishes
    /// its round after that writes its acknowledgement itself (see `Acker`).
    fn drop(&mut self) {
        self.stop_lanes.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[async_trait]
impl EventLog for IggyLog {
    /// Creates the topics now when Iggy is reachable; otherwise they are created as soon as
    /// it is (the host does not wait for Iggy to start).
    async fn ensure_topics(&self, wanted: &[String]) -> Result<(), LogError> {
        let new = self.remote.plan_topics(wanted)?;
        if !new.is_empty() && self.remote.health.connected() {
            for topic in &new {
                let error = match tokio::time::timeout(REQUEST_TIMEOUT, self.remote.ensure_topic(topic)).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "Iggy did not answer in time".to_owned(),
                };
                tracing::warn!(%topic, %error, "creating the topic in Iggy failed; will retry");
                self.forward.send_modify(|n| *n += 1);
            }
        } else if !new.is_empty() {
            self.forward.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    async fn append(&self, items: Vec<AppendItem>) -> Result<Vec<Appended>, LogError> {
        self.writer.append(items).await
    }

    /// Straight to Iggy, not through the spool (see `direct`).
    async fn forward(&self, items: Vec<AppendItem>) -> Result<(), Unforwarded> {
        let count = items.len();
        let forwarded = self.remote.forward_direct(items).await;
        let taken = match &forwarded {
            Ok(()) => {
                self.remote.health.forwarded(count as u64);
                count
            }
            // The failure said whether the connection is down; this must not undo it.
            Err(unforwarded) => {
                self.remote.health.counted(unforwarded.taken.len() as u64);
                unforwarded.taken.len()
            }
        };
        if taken > 0 {
            self.changes_tx.send_modify(|n| *n += 1);
        }
        forwarded
    }

    fn losses(&self) -> u64 {
        self.remote.health.losses()
    }

    async fn poll(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<Record>, LogError> {
        self.remote.poll(topic, partition, from, max).await
    }

    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        if let Some(n) = self.remote.known_partitions(topic) {
            return Ok(n);
        }
        let details = self.remote.topic_details(topic).await?;
        self.remote.found_partitions(topic, details.partitions_count);
        Ok(details.partitions_count)
    }

    async fn high_watermark(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.remote.high_watermark(topic, partition).await
    }

    async fn topics(&self) -> Result<Vec<String>, LogError> {
        let mut names: BTreeSet<String> = self.remote.topic_names().into_iter().collect();
        if let Ok(Some(stream)) = answered(self.remote.reader.get_stream(&self.remote.stream)).await {
            names.extend(stream.topics.into_iter().map(|t| t.name));
        }
        Ok(names.into_iter().collect())
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn topic_epoch(&self, topic: &str) -> Result<u64, LogError> {
        // Microseconds fit in 53 bits (a JSON number) until the year 2255.
        Ok(self.remote.topic_details(topic).await?.created_at.as_micros())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    fn note_consumer_offset(&self, consumer: &str, topic: &str, partition: u32, next: u64) {
        self.consumer_offsets.note(consumer, topic, partition, next);
    }

    async fn status(&self) -> serde_json::Value {
        status::status(&self.remote, &self.spool).await
    }

    fn readiness(&self) -> crate::log::Readiness {
        crate::log::Readiness { connected: self.remote.health.connected(), spool_depth: self.spool.depth() }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use owlery_testkit::IggyServer;

    use super::spool::SpoolEntry;
    use super::{IggyLog, IggySettings};
    use crate::envelope::Envelope;
    use crate::log::{AppendItem, EventLog, contract};

    fn item(n: u64) -> AppendItem {
        let envelope = Envelope::from_producer(serde_json::json!({"eventType": "a.b", "data": {"n": n}})).unwrap();
        AppendItem { topic: "t".into(), key: "k".into(), envelope }
    }

    /// An entry that cannot be read back and one Iggy refuses every time (an empty payload)
    /// are set aside; the events spooled before and after them reach Iggy, in order.
    #[tokio::test(flavor = "multi_thread")]
    #[cfg_attr(owlery_skip_iggy, ignore = "SKIPPED: OWLERY_SKIP_IGGY=1")]
    async fn spool_entries_that_cannot_go_out_are_set_aside_and_the_rest_go_out() {
        let server = IggyServer::start(false);
        let dir = tempfile::tempdir().unwrap();
        let settings = IggySettings { address: server.address(), partitions: 1, ..IggySettings::default() };
        let log = IggyLog::open(dir.path(), settings).unwrap();
        log.ensure_topics(&["t".to_owned()]).await.unwrap();
        log.append(vec![item(1)]).await.unwrap();
        log.spool.insert_raw(b"{ not an entry");
        let refused =
            SpoolEntry { topic: "t".into(), partition: 0, event_id: 7, payload: String::new(), key_hash: None };
        log.spool.insert_raw(&serde_json::to_vec(&refused).unwrap());
        log.append(vec![item(2)]).await.unwrap();
        log.forward.send_modify(|n| *n += 1);

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let records = log.poll("t", 0, 0, 10).await.unwrap_or_default();
            if records.len() >= 2 && log.spool.depth() == 0 {
                let ns: Vec<u64> = records
                    .iter()
                    .map(|r| Envelope::from_bytes(&r.payload).unwrap().data["n"].as_u64().unwrap())
                    .collect();
                assert_eq!(ns, [1, 2], "both good events, in order, once");
                break;
            }
            assert!(Instant::now() < deadline, "the spool is stuck: depth {}", log.spool.depth());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(log.spool.set_aside_count(), 2);
        let status = log.status().await;
        assert_eq!(status["spool"], serde_json::json!({"pending": 0, "setAside": 2}));
    }

    /// A log closed while its lanes forward, again and again, then opened on the same
    /// spool: every event is in Iggy once. A lane ends between rounds, so a round Iggy took
    /// always leaves the spool (seen before: a lane stopped mid-send left a round Iggy had
    /// taken in the spool, sent again after the reopen).
    #[tokio::test(flavor = "multi_thread")]
    #[cfg_attr(owlery_skip_iggy, ignore = "SKIPPED: OWLERY_SKIP_IGGY=1")]
    async fn a_log_closed_while_forwarding_sends_nothing_twice_after_a_reopen() {
        let server = IggyServer::start(false);
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let settings = IggySettings { address: server.address(), partitions: 1, ..IggySettings::default() };
            IggyLog::open(dir.path(), settings).unwrap()
        };
        let mut n = 0;
        for close in 0..16 {
            let log = open();
            log.ensure_topics(&["t".to_owned()]).await.unwrap();
            // Many small publishes: many rounds, one of them in flight at the close, at
            // moments from right after the last publish to a few milliseconds later.
            for _ in 0..40 {
                log.append(vec![item(n)]).await.unwrap();
                n += 1;
            }
            tokio::time::sleep(Duration::from_micros(500 * (close % 8))).await;
        }
        let log = open();
        let deadline = Instant::now() + Duration::from_secs(30);
        let ns: Vec<u64> = loop {
            let records = log.poll("t", 0, 0, 10_000).await.unwrap_or_default();
            if records.len() as u64 >= n && log.spool.depth() == 0 {
                break records
                    .iter()
                    .map(|r| Envelope::from_bytes(&r.payload).unwrap().data["n"].as_u64().unwrap())
                    .collect();
            }
            assert!(Instant::now() < deadline, "{} of {n} in Iggy, spool depth {}", records.len(), log.spool.depth());
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(ns, (0..n).collect::<Vec<_>>(), "each event once, in order");
    }

    /// Records a reader was given are kept for the others (`recent`); a topic deleted and
    /// made again in Iggy starts its offsets over, and what was kept of the old one must
    /// not be handed out for the new one.
    #[tokio::test(flavor = "multi_thread")]
    #[cfg_attr(owlery_skip_iggy, ignore = "SKIPPED: OWLERY_SKIP_IGGY=1")]
    async fn a_topic_made_again_is_read_from_iggy_not_from_what_was_kept() {
        use iggy::prelude::{
            Client, CompressionAlgorithm, Identifier, IggyClient, IggyExpiry, MaxTopicSize, TopicClient,
        };

        let server = IggyServer::start(false);
        let dir = tempfile::tempdir().unwrap();
        let settings = IggySettings { address: server.address(), partitions: 1, ..IggySettings::default() };
        let log = IggyLog::open(dir.path(), settings).unwrap();
        log.ensure_topics(&["t".to_owned()]).await.unwrap();
        log.append((1..=3).map(item).collect()).await.unwrap();
        let ns = |records: &[crate::log::Record]| -> Vec<u64> {
            records.iter().map(|r| Envelope::from_bytes(&r.payload).unwrap().data["n"].as_u64().unwrap()).collect()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while ns(&log.poll("t", 0, 0, 10).await.unwrap_or_default()) != [1, 2, 3] {
            assert!(Instant::now() < deadline, "the first three never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Kept now, and the tailer (a look every 50 ms) has seen the topic as it was.
        tokio::time::sleep(Duration::from_secs(1)).await;

        let client = IggyClient::from_connection_string(&format!("iggy://iggy:iggy@{}", server.address())).unwrap();
        client.connect().await.unwrap();
        let (stream, topic) = (Identifier::named("owlery").unwrap(), Identifier::named("t").unwrap());
        client.delete_topic(&stream, &topic).await.unwrap();
        let (none, expiry, size) = (CompressionAlgorithm::None, IggyExpiry::NeverExpire, MaxTopicSize::ServerDefault);
        client.create_topic(&stream, "t", 1, none, None, expiry, size).await.unwrap();
        log.append(vec![item(100), item(101)]).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let read = ns(&log.poll("t", 0, 0, 10).await.unwrap_or_default());
            if read == [100, 101] {
                break;
            }
            assert!(Instant::now() < deadline, "still read from offset 0: {read:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    contract::contract_suite!(skip_if: owlery_skip_iggy, {
        let server = IggyServer::start(false);
        let address = server.address();
        let open = move |dir: &Path| -> Arc<dyn EventLog> {
            let settings = IggySettings { address: address.clone(), partitions: 3, ..IggySettings::default() };
            Arc::new(IggyLog::open(dir, settings).unwrap())
        };
        (server, open)
    });
}
