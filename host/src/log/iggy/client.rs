//! The connections to Iggy and what every request over them shares: sign-in, a time limit
//! per request, failing fast while Iggy is known to be down, and the topics known to exist.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use iggy::prelude::{
    Client, CompressionAlgorithm, Identifier, IggyClient, IggyError, IggyExpiry, IggyMessage, MaxTopicSize,
    MessageClient, Partition, Partitioning, StreamClient, TopicClient, TopicDetails, UserClient,
};

use super::ends::Ends;
use super::health::Health;
use super::recent::Recent;
use super::settings::IggySettings;
use crate::log::{LogError, StorageError, Unavailable, partition_for};

/// How long one request to Iggy may take. The client reconnects forever in the background,
/// so a request made while the server is down would otherwise wait until it is back, and
/// anything waiting on it (a status page, a replay, a runner) would hang with it.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections the forwarder sends over (see `Remote::senders`), one per forwarder lane.
pub(super) const SEND_CONNECTIONS: usize = 4;
/// Connections polls go over (see `Remote::pollers`).
const POLL_CONNECTIONS: usize = 4;
/// Connections entries forwarded straight from the outbox go over (see `Remote::direct`):
/// one for the shared fan-out topic, one for the rest.
pub(super) const DIRECT_CONNECTIONS: usize = 2;

/// Why connecting, creating topics or forwarding failed (shown as the last error).
#[derive(Debug, thiserror::Error)]
pub(super) enum RemoteError {
    #[error("connecting: {0}")]
    Connect(IggyError),
    #[error("signing in as {user}: {source}")]
    SignIn { user: String, source: LogError },
    #[error("creating stream {stream}: {source}")]
    CreateStream { stream: String, source: IggyError },
    #[error("creating topic {topic}: {source}")]
    CreateTopic { topic: String, source: IggyError },
    #[error("topic {0} vanished")]
    Vanished(String),
    #[error("topic {0} has no partitions")]
    NoPartitions(String),
    #[error("sending to {topic}/{partition}: {source}")]
    Send { topic: String, partition: u32, source: LogError },
    #[error(transparent)]
    Iggy(#[from] IggyError),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// `request`, or `Unavailable` if Iggy does not answer within `REQUEST_TIMEOUT`.
pub(super) async fn answered<T>(request: impl Future<Output = Result<T, IggyError>>) -> Result<T, LogError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Unavailable::NoAnswer(REQUEST_TIMEOUT).into()),
    }
}

pub(super) fn ident(name: &str) -> Result<Identifier, LogError> {
    Identifier::named(name).map_err(|source| StorageError::Name { name: name.to_owned(), source }.into())
}

/// The offset the next message of the partition will get.
pub(super) fn end_of(partition: &Partition) -> u64 {
    if partition.messages_count == 0 { 0 } else { partition.current_offset + 1 }
}

/// Connect `client` (a no-op when it is), and sign in again: the client's own reconnect
/// after a server restart was seen to leave a connection up but signed out (every request
/// then answered Unauthenticated).
pub(super) async fn connect_signed_in(client: &IggyClient, settings: &IggySettings) -> Result<(), RemoteError> {
    client.connect().await.map_err(RemoteError::Connect)?;
    answered(client.login_user(&settings.username, &settings.password))
        .await
        .map(drop)
        .map_err(|source| RemoteError::SignIn { user: settings.username.clone(), source })
}

/// The Iggy server as the backend's tasks share it.
pub(super) struct Remote {
    pub(super) settings: IggySettings,
    /// Writes: the forwarder's sends, topic creation, consumer offsets.
    pub(super) client: Arc<IggyClient>,
    /// Reads of the stream and topics, on a connection of their own, so that they do not
    /// queue behind sends that wait for Iggy's fsync.
    pub(super) reader: IggyClient,
    /// Polls of messages, taken in turn: one connection answers one request at a time, and
    /// every runner polls every partition that moved (measured on a 2-core machine with
    /// three plugins at 1,000 events/s: one connection made each runner's batches 21 ms
    /// apart, most of it queueing).
    pollers: Vec<IggyClient>,
    next_poller: std::sync::atomic::AtomicUsize,
    /// More connections for the forwarder's sends: each waits for its partition's fsync, so
    /// sends to different partitions go over different connections at once.
    senders: Vec<Arc<IggyClient>>,
    /// The outbox's own connections (see `direct`), each signed in when first used and
    /// again after a failure: they do not queue behind the spool's sends.
    pub(super) direct: Vec<(IggyClient, tokio::sync::Mutex<bool>)>,
    pub(super) stream: Identifier,
    /// topic → (partitions, whether that count was read from the server rather than planned
    /// with the settings')
    topics: Mutex<BTreeMap<String, (u32, bool)>>,
    pub(super) health: Health,
    pub(super) ends: Mutex<Ends>,
    /// The records last read from each partition, shared by the readers.
    pub(super) recent: Recent,
}

impl Remote {
    /// The connections, not connected yet (see `prepare`).
    pub(super) fn new(settings: IggySettings) -> Result<Remote, LogError> {
        let url = settings.connection_string();
        let connect = || IggyClient::from_connection_string(&url).map_err(StorageError::Connection);
        let client = Arc::new(connect()?);
        let reader = connect()?;
        let pollers = (0..POLL_CONNECTIONS).map(|_| connect()).collect::<Result<_, _>>()?;
        let mut senders = vec![client.clone()];
        for _ in 1..SEND_CONNECTIONS {
            senders.push(Arc::new(connect()?));
        }
        let direct =
            (0..DIRECT_CONNECTIONS).map(|_| Ok((connect()?, Default::default()))).collect::<Result<_, LogError>>()?;
        let stream = ident(&settings.stream)?;
        Ok(Remote {
            settings,
            client,
            reader,
            pollers,
            next_poller: Default::default(),
            senders,
            direct,
            stream,
            topics: Mutex::default(),
            health: Health::default(),
            ends: Mutex::default(),
            recent: Recent::default(),
        })
    }

    fn topics(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (u32, bool)>> {
        self.topics.lock().expect("topics lock")
    }

    pub(super) fn ends(&self) -> std::sync::MutexGuard<'_, Ends> {
        self.ends.lock().expect("ends lock")
    }

    pub(super) fn topic_names(&self) -> Vec<String> {
        self.topics().keys().cloned().collect()
    }

    /// The partitions of `topic`, as read from the server or as planned.
    pub(super) fn known_partitions(&self, topic: &str) -> Option<u32> {
        self.topics().get(topic).map(|(count, _)| *count)
    }

    /// The partitions of `topic` as read from the server: what sends go by.
    pub(super) fn partitions_in_iggy(&self, topic: &str) -> Option<u32> {
        self.topics().get(topic).filter(|(_, read)| *read).map(|(count, _)| *count)
    }

    pub(super) fn found_partitions(&self, topic: &str, partitions: u32) {
        self.topics().insert(topic.to_owned(), (partitions, true));
    }

    /// The partitions of `topic`; a topic not known yet is planned with the settings'
    /// count, and created in Iggy when the forwarder next connects or sends.
    pub(super) fn plan_topic(&self, topic: &str) -> u32 {
        self.topics().entry(topic.to_owned()).or_insert_with(|| (self.settings.partitions_of(topic), false)).0
    }

    /// Plans the `wanted` topics not known yet; returns them.
    pub(super) fn plan_topics(&self, wanted: &[String]) -> Result<Vec<String>, LogError> {
        let mut topics = self.topics();
        let mut new = Vec::new();
        for topic in wanted {
            crate::envelope::check_topic(topic)
                .map_err(|reason| StorageError::Topic { topic: topic.clone(), reason })?;
            if !topics.contains_key(topic) {
                topics.insert(topic.clone(), (self.settings.partitions_of(topic), false));
                new.push(topic.clone());
            }
        }
        Ok(new)
    }

    /// The partition of `topic` in Iggy that an entry spooled for `partition` goes to: its
    /// key's partition among as many as the topic has now (the host accepts events before
    /// it has read a topic already in Iggy, planning it with the settings' count, which
    /// may not be the topic's); one spooled without its key's hash (by an earlier
    /// version) goes to `partition`, or to `partition % count` if the topic has fewer.
    pub(super) fn partition_in_iggy(&self, topic: &str, partition: u32, key_hash: Option<u64>) -> u32 {
        partition_among(self.partitions_in_iggy(topic).unwrap_or(1), partition, key_hash)
    }

    /// The lane an entry spooled for `partition` goes over: that of its partition in Iggy
    /// (see `partition_in_iggy`), once the topic's partitions there are read (`None`
    /// before, when which partition that is is not known yet). One look at the topics, since
    /// the forwarder's peek asks this of every spooled entry.
    pub(super) fn lane_of_entry(&self, topic: &str, partition: u32, key_hash: Option<u64>) -> Option<usize> {
        let count = self.partitions_in_iggy(topic)?;
        Some(self.lane_of(topic, partition_among(count, partition, key_hash)))
    }

    /// The lane (and connection) sends to a partition in Iggy (see `partition_in_iggy`) go
    /// over, so that one partition stays in order. The shared fan-out topic has lane 0 to itself: every
    /// broadcast goes through it on its way to the clients, and it must not queue behind
    /// another partition's send (measured: p50 end to end 43 → 40 ms at 1,000 events/s).
    pub(super) fn lane_of(&self, topic: &str, partition: u32) -> usize {
        if topic == crate::fanout::FANOUT_TOPIC {
            return 0;
        }
        1 + partition_for(&format!("{topic}/{partition}"), self.senders.len() as u32 - 1) as usize
    }

    /// The next connection to poll over.
    pub(super) fn poller(&self) -> &IggyClient {
        let n = self.next_poller.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.pollers[n % self.pollers.len()]
    }

    pub(super) fn sender_for(&self, topic: &str, partition: u32) -> &IggyClient {
        &self.senders[self.lane_of(topic, partition)]
    }

    /// One request of `messages` (event id, payload) to a partition over `sender`; `Ok`
    /// once Iggy acknowledged it. Not acknowledged in time counts as not sent.
    pub(super) async fn send_to(
        &self,
        sender: &IggyClient,
        topic: &str,
        partition: u32,
        messages: impl ExactSizeIterator<Item = (u128, Bytes)>,
    ) -> Result<(), LogError> {
        let count = messages.len();
        let mut built = Vec::with_capacity(count);
        for (id, payload) in messages {
            built.push(IggyMessage::builder().id(id).payload(payload).build()?);
        }
        let topic_id = ident(topic)?;
        let started = std::time::Instant::now();
        let partitioning = Partitioning::partition_id(partition);
        let sent = answered(sender.send_messages(&self.stream, &topic_id, &partitioning, &mut built)).await;
        // Unknown from now on, whatever the answer: a request that timed out may have landed.
        self.ends().sent(topic, partition);
        sent?;
        tracing::debug!(%topic, partition, messages = count, took = ?started.elapsed(), "sent to Iggy");
        crate::metrics::metrics().iggy_forward_seconds.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// What a forwarder lane needs before sending: lane 0 prepares everything (see
    /// `prepare`); the others connect their own connection.
    pub(super) async fn prepare_lane(&self, lane: usize) -> Result<(), RemoteError> {
        if lane == 0 {
            return self.prepare().await;
        }
        connect_signed_in(&self.senders[lane], &self.settings).await
    }

    /// Connect, then create the stream and the known topics if missing. Idempotent, and
    /// safe when another host does the same at the same moment.
    pub(super) async fn prepare(&self) -> Result<(), RemoteError> {
        // All at once: each sign-in is a round trip of its own, 20-110 ms on a busy 2-core
        // machine, and one after another they held up forwarding 420 ms after a start.
        let connections = [&*self.client, &self.reader].into_iter().chain(&self.pollers);
        let outbox = self.direct.iter().map(|(client, ready)| async move {
            // Ready before the outbox's first send; a failure here is the outbox's to retry
            // (it does not hold up the spool's lanes).
            if let Err(error) = self.signed_in(client, ready).await {
                tracing::debug!(%error, "connecting the outbox's connection to Iggy failed; retried on its next send");
            }
        });
        // Each to its end, failed or not: a connect dropped half-way leaves its client
        // counting as connecting, and its next connect a no-op.
        let (signed_in, _) = tokio::join!(
            futures_util::future::join_all(connections.map(|c| connect_signed_in(c, &self.settings))),
            futures_util::future::join_all(outbox),
        );
        signed_in.into_iter().collect::<Result<Vec<()>, _>>()?;
        if self.client.get_stream(&self.stream).await?.is_none() {
            match self.client.create_stream(&self.settings.stream).await {
                Ok(_) | Err(IggyError::StreamNameAlreadyExists(_)) => {}
                Err(source) => return Err(RemoteError::CreateStream { stream: self.settings.stream.clone(), source }),
            }
        }
        for topic in self.topic_names() {
            self.ensure_topic(&topic).await?;
        }
        if self.health.up() {
            tracing::info!("connected to Iggy");
        }
        Ok(())
    }

    /// Make `topic` if missing and learn its partitions; `Unavailable` if Iggy does not
    /// answer all of it within `REQUEST_TIMEOUT` (a forwarder lane waits for this before
    /// it may stop).
    pub(super) async fn ensure_topic(&self, topic: &str) -> Result<(), RemoteError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.ensure_topic_now(topic)).await {
            Ok(result) => result,
            Err(_) => Err(RemoteError::Log(Unavailable::NoAnswer(REQUEST_TIMEOUT).into())),
        }
    }

    async fn ensure_topic_now(&self, topic: &str) -> Result<(), RemoteError> {
        let id = Identifier::named(topic)?;
        if self.client.get_topic(&self.stream, &id).await?.is_none() {
            let created = self
                .client
                .create_topic(
                    &self.stream,
                    topic,
                    self.settings.partitions_of(topic),
                    CompressionAlgorithm::None,
                    None,
                    IggyExpiry::NeverExpire,
                    MaxTopicSize::ServerDefault,
                )
                .await;
            match created {
                Ok(_) | Err(IggyError::TopicNameAlreadyExists(..)) => {}
                Err(source) => return Err(RemoteError::CreateTopic { topic: topic.to_owned(), source }),
            }
        }
        // Ask again rather than trust the creation's answer: that is what the server holds
        // (another host may have created it first, with another partition count).
        let details =
            self.client.get_topic(&self.stream, &id).await?.ok_or_else(|| RemoteError::Vanished(topic.to_owned()))?;
        if details.partitions_count == 0 {
            return Err(RemoteError::NoPartitions(topic.to_owned()));
        }
        self.found_partitions(topic, details.partitions_count);
        Ok(())
    }

    pub(super) async fn topic_details(&self, topic: &str) -> Result<TopicDetails, LogError> {
        self.health.need_connection()?;
        answered(self.reader.get_topic(&self.stream, &ident(topic)?))
            .await?
            .ok_or_else(|| LogError::NoSuchTopic(topic.to_owned()))
    }
}

/// `partition_in_iggy` for a topic of `count` partitions in Iggy.
fn partition_among(count: u32, partition: u32, key_hash: Option<u64>) -> u32 {
    let count = count.max(1);
    match key_hash {
        Some(hash) => crate::log::partition_of_hash(hash, count),
        None if partition >= count => partition % count,
        None => partition,
    }
}

#[cfg(test)]
mod tests {
    use super::Remote;
    use crate::log::iggy::IggySettings;
    use crate::log::{key_hash, partition_for};

    #[test]
    fn a_spooled_entry_goes_to_its_keys_partition_of_the_partitions_the_topic_has_in_iggy() {
        let remote = Remote::new(IggySettings { partitions: 1, ..IggySettings::default() }).unwrap();
        let key = (0..).map(|n| format!("incident-{n}")).find(|k| partition_for(k, 8) != 0).unwrap();
        let hash = Some(key_hash(&key));
        // Accepted before the host had read the topic: planned with the settings' count.
        assert_eq!(remote.plan_topic("t"), 1);
        assert_eq!(remote.partition_in_iggy("t", 0, hash), 0);
        // No lane takes it until the topic is read from Iggy.
        assert_eq!(remote.lane_of_entry("t", 0, hash), None);
        // Iggy's topic has eight: the key's partition of eight, where its other events are,
        // over that partition's lane.
        remote.found_partitions("t", 8);
        assert_eq!(remote.partition_in_iggy("t", 0, hash), partition_for(&key, 8));
        assert_eq!(remote.lane_of_entry("t", 0, hash), Some(remote.lane_of("t", partition_for(&key, 8))));
        // Spooled by an earlier version, without the hash: where it was accepted for, or
        // wrapped around when the topic has fewer partitions now.
        assert_eq!(remote.partition_in_iggy("t", 5, None), 5);
        remote.found_partitions("t", 4);
        assert_eq!(remote.partition_in_iggy("t", 5, None), 1);
        assert_eq!(remote.partition_in_iggy("t", 5, hash), partition_for(&key, 4));
    }
}
