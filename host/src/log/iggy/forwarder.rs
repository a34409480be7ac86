//! Sends the spool to Iggy in order, forever: connects (and creates the stream and topics),
//! sends each partition's entries over its own connection, removes what Iggy acknowledged,
//! and after a lost connection sends the last acknowledged entries again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use iggy::prelude::{Identifier, IggyMessage, MessageClient, Partitioning};
use tokio::sync::{Notify, watch};

use super::client::{Remote, RemoteError, answered};
use super::spool::{Spool, SpoolEntry};

/// Spool entries sent per round. A crash between Iggy's acknowledgement and the spool's
/// cleanup resends at most this many per partition; runners remember at least as many ids
/// per partition (`SEEN_PRIME`), so the copies are recognised.
pub const FORWARD_BATCH: usize = 512;

/// Acknowledged entries sent again after the connection to Iggy was lost. Iggy 0.8.0 was
/// seen (kill -9 with every batch fsynced) to come back with the last message written
/// before the crash unreadable although it had acknowledged it; a copy sent again is read
/// instead, and runners skip the copies of what they already applied.
pub(super) const RESEND_AFTER_LOSS: u64 = FORWARD_BATCH as u64;

/// Spool entries of one (topic, partition), in order.
type PartitionGroup = ((String, u32), Vec<(u64, SpoolEntry)>);

pub(super) struct Forwarder {
    pub(super) remote: Arc<Remote>,
    pub(super) spool: Arc<Spool>,
    /// Notified when something was spooled or a topic is wanted.
    pub(super) wake: Arc<Notify>,
    /// Counted up when something reached Iggy, to wake the readers.
    pub(super) changes: watch::Sender<u64>,
}

/// What the forwarder knows of the connection between rounds.
struct Round {
    backoff: Duration,
    ready: bool,
    /// Connection losses whose recently acknowledged entries were sent again.
    resent_for: u64,
}

impl Forwarder {
    pub(super) async fn run(self) {
        let mut round = Round { backoff: Duration::from_millis(100), ready: false, resent_for: 0 };
        loop {
            if !round.ready && !self.connect(&mut round).await {
                continue;
            }
            let losses = self.remote.health.losses();
            if losses != round.resent_for {
                match self.spool.recent() {
                    Ok(recent) => self.resend(&mut round, recent, losses).await,
                    Err(e) => self.spool_unreadable(&e).await,
                }
                continue;
            }
            let entries = match self.spool.peek(FORWARD_BATCH) {
                Ok(entries) => entries,
                Err(e) => {
                    self.spool_unreadable(&e).await;
                    continue;
                }
            };
            if entries.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            match self.send(entries, true).await {
                Ok(()) => self.changes.send_modify(|n| *n += 1),
                Err(e) => self.failed(&mut round, &e).await,
            }
        }
    }

    /// Connect and prepare; returns whether that worked (else it waited a backoff).
    async fn connect(&self, round: &mut Round) -> bool {
        match self.remote.prepare().await {
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
            Ok(()) => round.resent_for = losses,
            Err(e) => self.failed(round, &e).await,
        }
    }

    async fn failed(&self, round: &mut Round, error: &RemoteError) {
        self.remote.health.failed(&error.to_string());
        round.ready = false;
        tokio::time::sleep(round.backoff).await;
    }

    async fn spool_unreadable(&self, error: &crate::log::LogError) {
        tracing::error!(%error, "reading the spool failed");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    /// Send spool entries partition by partition, in order; with `acknowledge`, each group
    /// Iggy acknowledged leaves the spool at once.
    async fn send(&self, entries: Vec<(u64, SpoolEntry)>, acknowledge: bool) -> Result<(), RemoteError> {
        let mut groups: Vec<PartitionGroup> = Vec::new();
        for (seq, entry) in entries {
            let key = (entry.topic.clone(), entry.partition);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, group)) => group.push((seq, entry)),
                None => groups.push((key, vec![(seq, entry)])),
            }
        }
        for ((topic, _), _) in &groups {
            if self.remote.known_partitions(topic).is_none() {
                self.remote.ensure_topic(topic).await?;
            }
        }
        // Partitions are independent: send to all of them at once, each in order.
        let sends = groups.into_iter().map(|((topic, partition), group)| self.send_partition(topic, partition, group));
        let mut first_error = None;
        for result in futures_util::future::join_all(sends).await {
            match result {
                Ok(seqs) if acknowledge => {
                    self.spool.acknowledged(&seqs)?;
                    self.remote.health.forwarded(seqs.len() as u64);
                }
                Ok(_) => {
                    self.remote.health.up();
                }
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// One partition's entries in one request; returns their spool sequences.
    async fn send_partition(
        &self,
        topic: String,
        partition: u32,
        group: Vec<(u64, SpoolEntry)>,
    ) -> Result<Vec<u64>, RemoteError> {
        let mut messages = Vec::with_capacity(group.len());
        for (_, entry) in &group {
            messages
                .push(IggyMessage::builder().id(entry.event_id).payload(Bytes::from(entry.payload.clone())).build()?);
        }
        let topic_id = Identifier::named(&topic)?;
        let started = std::time::Instant::now();
        // Not acknowledged in time counts as not sent: it stays in the spool and is sent
        // again (a copy that did arrive is skipped by the runners, by its eventId).
        let sender = self.remote.sender_for(&topic, partition);
        let partitioning = Partitioning::partition_id(partition);
        answered(sender.send_messages(&self.remote.stream, &topic_id, &partitioning, &mut messages))
            .await
            .map_err(|source| RemoteError::Send { topic: topic.clone(), partition, source })?;
        tracing::debug!(%topic, partition, messages = group.len(), took = ?started.elapsed(), "sent to Iggy");
        self.remote.ends().sent(&topic, partition);
        Ok(group.iter().map(|(seq, _)| *seq).collect())
    }
}
