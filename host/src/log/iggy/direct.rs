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
use iggy::prelude::{IggyClient, IggyError};
use tokio::sync::Mutex;

use super::client::{REQUEST_TIMEOUT, Remote, RemoteError, connect_signed_in};
use super::forwarder::{iggy_cause, refusal, request_len_by};
use crate::log::{AppendItem, LogError, StorageError, Unavailable, Unforwarded, partition_for};

/// One partition's messages: (index in what was forwarded, event id, payload), in order.
type Group = ((String, u32), Vec<(usize, u128, Bytes)>);

impl Remote {
    /// Send `items` to Iggy, each partition's in order (the fan-out topic over its own
    /// connection, the other partitions one after another over the other); `Ok` once Iggy
    /// acknowledged every one. A failure says which items Iggy took all the same. One that
    /// lies in the entries themselves (Iggy refuses them, a topic name it cannot take) is
    /// `LogError::Refused` or a storage error `outbox::is_refusal` knows; anything else is
    /// worth trying again, and is what a failure reports when there are both.
    pub(super) async fn forward_direct(&self, items: Vec<AppendItem>) -> Result<(), Unforwarded> {
        let nothing_taken = |error: LogError| Unforwarded { error, taken: Vec::new() };
        self.health.need_connection().map_err(|e| nothing_taken(e.into()))?;
        let mut topics: Vec<&str> = items.iter().map(|i| i.topic.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        for topic in topics {
            if self.partitions_in_iggy(topic).is_none() {
                self.make_topic(topic).await.map_err(nothing_taken)?;
            }
        }
        let mut groups: Vec<Group> = Vec::new();
        for (index, item) in items.into_iter().enumerate() {
            let count = self.partitions_in_iggy(&item.topic).unwrap_or(1).max(1);
            let key = (item.topic, partition_for(&item.key, count));
            let message = (index, item.envelope.event_id.as_u128(), Bytes::from(item.envelope.to_bytes()));
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, messages)) => messages.push(message),
                None => groups.push((key, vec![message])),
            }
        }
        let sends = groups.iter().map(|((topic, partition), messages)| self.send_group(topic, *partition, messages));
        let mut taken = Vec::new();
        let mut failure: Option<LogError> = None;
        for ((_, messages), sent) in groups.iter().zip(futures_util::future::join_all(sends).await) {
            let count = match sent {
                Ok(()) => messages.len(),
                Err((count, error)) => {
                    // A lost connection matters more than a refusal: it is what is reported.
                    if failure.as_ref().is_none_or(|f| matches!(f, LogError::Refused { .. })) {
                        failure = Some(error);
                    }
                    count
                }
            };
            taken.extend(messages[..count].iter().map(|(index, _, _)| *index));
        }
        match failure {
            None => Ok(()),
            Some(error) => {
                taken.sort_unstable();
                Err(Unforwarded { error, taken })
            }
        }
    }

    /// Create `topic` (or find it made): its name is checked first, a name Iggy cannot
    /// take being the entries' fault.
    async fn make_topic(&self, topic: &str) -> Result<(), LogError> {
        crate::envelope::check_topic(topic)
            .map_err(|reason| StorageError::Topic { topic: topic.to_owned(), reason })?;
        match tokio::time::timeout(REQUEST_TIMEOUT, self.ensure_topic(topic)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(RemoteError::CreateTopic { source, .. })) if refusal(&source) || name_refused(&source) => {
                Err(StorageError::Topic { topic: topic.to_owned(), reason: source.to_string() }.into())
            }
            Ok(Err(e)) => Err(Unavailable::Disconnected(e.to_string()).into()),
            Err(_) => Err(Unavailable::NoAnswer(REQUEST_TIMEOUT).into()),
        }
    }

    /// One partition's messages, in requests capped like the spool's; a failure says how
    /// many of them Iggy acknowledged before it.
    async fn send_group(
        &self,
        topic: &str,
        partition: u32,
        messages: &[(usize, u128, Bytes)],
    ) -> Result<(), (usize, LogError)> {
        // The fan-out topic has a connection of its own: every broadcast goes through it.
        let (client, ready) = &self.direct[usize::from(topic != crate::fanout::FANOUT_TOPIC)];
        self.signed_in(client, ready).await.map_err(|e| (0, e))?;
        let mut sent = 0;
        while sent < messages.len() {
            let rest = &messages[sent..];
            let take = request_len_by(rest, |(_, _, payload)| payload.len());
            let request = rest[..take].iter().map(|(_, id, payload)| (*id, payload.clone()));
            if let Err(error) = self.send_to(client, topic, partition, request).await {
                return Err((sent, self.direct_failed(error, topic, partition, ready).await));
            }
            sent += take;
        }
        Ok(())
    }

    /// Connect and sign in `client` if it is not (one caller at a time: the client answers
    /// a second `connect` made while the first is under way with `Ok` at once, and that
    /// caller's sign-in then fails), all within the request time limit.
    pub(super) async fn signed_in(&self, client: &IggyClient, ready: &Mutex<bool>) -> Result<(), LogError> {
        let connect = async {
            let mut ready = ready.lock().await;
            if !*ready {
                connect_signed_in(client, &self.settings)
                    .await
                    .map_err(|e| LogError::from(Unavailable::Disconnected(e.to_string())))?;
                *ready = true;
            }
            Ok(())
        };
        tokio::time::timeout(REQUEST_TIMEOUT, connect)
            .await
            .unwrap_or(Err(Unavailable::NoAnswer(REQUEST_TIMEOUT).into()))
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

/// Errors creating a topic that lie in its name.
fn name_refused(error: &IggyError) -> bool {
    matches!(error, IggyError::InvalidTopicName)
}
