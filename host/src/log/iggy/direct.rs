//! Entries forwarded straight to Iggy, without the spool: the outbox's (broadcasts,
//! plugins' publishes, dead letters, HTTP requests), which the store already holds durably
//! until Iggy has acknowledged them. Measured at 1,000 events/s on Iggy with the three
//! shipped plugins: they were 62% of what went through the spool, each one a durable write
//! in, a peek, a durable acknowledgement out and a forwarder round to wait for, on the way
//! of every broadcast to the clients.
//!
//! What the spool does for its own entries the caller does for these: it keeps them until
//! `Ok`, sends them again after a failure (a copy that reached Iggy before the failure is
//! skipped by its readers, by event id) and sends its last ones again after a lost
//! connection (`EventLog::losses`: a crashed Iggy can come back without the last message it
//! acknowledged).

use bytes::Bytes;
use iggy::prelude::IggyError;
use tokio::sync::Mutex;

use super::client::{REQUEST_TIMEOUT, Remote, connect_signed_in};
use super::forwarder::{iggy_cause, refusal, request_len_by};
use crate::log::{AppendItem, LogError, StorageError, Unavailable, partition_for};

/// One partition's messages (event id, payload), in order.
type Group = ((String, u32), Vec<(u128, Bytes)>);

impl Remote {
    /// Send `items` to Iggy, each partition's in order, the partitions at once; `Ok` once
    /// Iggy acknowledged every one. A failure that lies in the entries themselves (Iggy
    /// refuses them, a topic name it cannot take) is `LogError::Refused` or a storage error
    /// `outbox::is_refusal` knows; anything else is worth trying again.
    pub(super) async fn forward_direct(&self, items: Vec<AppendItem>) -> Result<(), LogError> {
        self.health.need_connection()?;
        let mut topics: Vec<&str> = items.iter().map(|i| i.topic.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        for topic in topics {
            if self.known_partitions(topic).is_none() {
                crate::envelope::check_topic(topic)
                    .map_err(|reason| StorageError::Topic { topic: topic.to_owned(), reason })?;
                match tokio::time::timeout(REQUEST_TIMEOUT, self.ensure_topic(topic)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(Unavailable::Disconnected(e.to_string()).into()),
                    Err(_) => return Err(Unavailable::NoAnswer(REQUEST_TIMEOUT).into()),
                }
            }
        }
        let mut groups: Vec<Group> = Vec::new();
        for item in items {
            let count = self.known_partitions(&item.topic).unwrap_or(1).max(1);
            let key = (item.topic, partition_for(&item.key, count));
            let message = (item.envelope.event_id.as_u128(), Bytes::from(item.envelope.to_bytes()));
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, messages)) => messages.push(message),
                None => groups.push((key, vec![message])),
            }
        }
        let sends = groups.iter().map(|((topic, partition), messages)| self.send_group(topic, *partition, messages));
        futures_util::future::join_all(sends).await.into_iter().collect()
    }

    /// One partition's messages, in requests capped like the spool's.
    async fn send_group(&self, topic: &str, partition: u32, messages: &[(u128, Bytes)]) -> Result<(), LogError> {
        // The fan-out topic has a connection of its own: every broadcast goes through it.
        let (client, ready) = &self.direct[usize::from(topic != crate::fanout::FANOUT_TOPIC)];
        {
            // One at a time: the client answers a second `connect` made while the first is
            // under way with `Ok` at once, and that caller's sign-in then fails.
            let mut ready = ready.lock().await;
            if !*ready {
                match tokio::time::timeout(REQUEST_TIMEOUT, connect_signed_in(client, &self.settings)).await {
                    Ok(Ok(())) => *ready = true,
                    Ok(Err(e)) => return Err(Unavailable::Disconnected(e.to_string()).into()),
                    Err(_) => return Err(Unavailable::NoAnswer(REQUEST_TIMEOUT).into()),
                }
            }
        }
        let mut rest = messages;
        while !rest.is_empty() {
            let take = request_len_by(rest, |(_, payload)| payload.len());
            let (request, after) = rest.split_at(take);
            rest = after;
            if let Err(error) = self.send_to(client, topic, partition, request.iter().cloned()).await {
                return Err(self.direct_failed(error, topic, partition, ready).await);
            }
        }
        Ok(())
    }

    /// What a failed direct send means for the caller.
    async fn direct_failed(&self, error: LogError, topic: &str, partition: u32, ready: &Mutex<bool>) -> LogError {
        let cause = iggy_cause(&error);
        if cause.is_some_and(refusal) {
            return LogError::Refused { topic: topic.to_owned(), partition, source: Box::new(error) };
        }
        if matches!(cause, Some(IggyError::PartitionNotFound(..) | IggyError::TopicIdNotFound(..))) {
            // Made again by another client: read its partitions again; the caller's next
            // try picks partitions among the ones it has now.
            tracing::warn!(%error, topic, "reading the topic's partitions again");
            if let Ok(Err(e)) = tokio::time::timeout(REQUEST_TIMEOUT, self.ensure_topic(topic)).await {
                tracing::warn!(error = %e, topic, "reading the topic's partitions failed");
            }
            return error;
        }
        // Signed in again before the next send (a server restart signs every connection out).
        *ready.lock().await = false;
        self.health.failed(&error.to_string());
        error
    }
}
