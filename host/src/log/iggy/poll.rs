//! Reading a partition from Iggy: one page of records, stepping over a message Iggy cannot
//! read, and telling a topic or partition that does not exist from one not visible yet.

use iggy::prelude::{Consumer, IggyError, MessageClient, PollingStrategy};

use super::client::{REQUEST_TIMEOUT, Remote, connect_signed_in, end_of, ident};
use crate::log::{LogError, Record, Unavailable};

/// Why one poll request failed.
enum PollError {
    /// Iggy's InvalidOffset: past the end, or (see `poll`) a count it cannot serve.
    InvalidOffset,
    Log(LogError),
}

impl From<LogError> for PollError {
    fn from(e: LogError) -> Self {
        PollError::Log(e)
    }
}

impl Remote {
    /// Up to `max` records of a partition from `from`, in order: what another reader just
    /// read (see `recent`), else from Iggy.
    pub(super) async fn poll(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Record>, LogError> {
        let answered = |by: &str| crate::metrics::metrics().iggy_polls.with_label_values(&[by]).inc();
        if self.ends().nothing_from(topic, partition, from) {
            answered("end");
            return Ok(Vec::new());
        }
        let kept = self.recent.partition(topic, partition);
        let (mut records, next) = match kept.read(from, max) {
            Some(read) if read.whole => {
                answered("kept");
                return Ok(read.records);
            }
            // Kept, but Iggy may have more: ask for what follows.
            Some(read) => (read.records, read.end),
            None => (Vec::new(), from),
        };
        let want = max - records.len();
        // At the end of what is kept, readers take turns: the one before may have brought
        // what this one wants, or learnt that there is nothing yet.
        let turn = if kept.at_end(next) { Some(kept.fetching.lock().await) } else { None };
        if turn.is_some() {
            if let Some(read) = kept.read(next, want) {
                answered("kept");
                records.extend(read.records);
                return Ok(records);
            }
            if self.ends().nothing_from(topic, partition, next) {
                answered("end");
                return Ok(records);
            }
        }
        answered("iggy");
        match self.fetch(topic, partition, next, want).await {
            Ok(more) if more.is_empty() && kept.beyond(next) => {
                // Nothing where the run holds records: not the partition they were read from.
                self.recent.forget(topic);
                Ok(Vec::new())
            }
            Ok(more) => {
                kept.put(next, want, &more);
                records.extend(more);
                Ok(records)
            }
            Err(e) => {
                match &e {
                    LogError::NoSuchTopic(_) | LogError::NoSuchPartition { .. } => self.recent.forget(topic),
                    // Iggy may be restarting, and may lose records: what is kept may not be so.
                    LogError::Unavailable(_) => self.recent.clear(),
                    _ => {}
                }
                Err(e)
            }
        }
    }

    /// Up to `max` records of a partition from `from`, in order, from Iggy.
    async fn fetch(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<Record>, LogError> {
        let generation = {
            let ends = self.ends();
            if ends.nothing_from(topic, partition, from) {
                return Ok(Vec::new());
            }
            ends.generation(topic, partition)
        };
        let max = max.clamp(1, u32::MAX as usize);
        let mut records: Vec<Record> = Vec::new();
        let mut next = from;
        let mut cap = max;
        while records.len() < max {
            let count = cap.min(max - records.len());
            match self.poll_once(topic, partition, next, count as u32).await {
                Ok(batch) => {
                    let Some(last) = batch.last().map(|r| r.offset) else {
                        if records.is_empty() {
                            // Nothing at `next`: that is where the partition ends, unless
                            // this host sent to it since (then `read` keeps it unknown).
                            // The next polls of a partition with nothing new are answered
                            // here, not by Iggy, until something is sent to it (measured:
                            // every wake-up polled every partition of every reader).
                            self.ends().learn(topic, partition, next, generation);
                        }
                        break;
                    };
                    next = last + 1;
                    records.extend(batch);
                    // The usual case: one request. Only after shrinking the count (below)
                    // does it take more than one to fill the page.
                    if cap == max {
                        break;
                    }
                }
                // Iggy 0.8.0 answers InvalidOffset to any poll whose range covers a message
                // it cannot read: seen after a kill -9 and restart, one message of one
                // partition (the one being written at the kill), while the messages before
                // and after it read fine. Shrink the count to read up to it...
                Err(PollError::InvalidOffset) if count > 1 => cap = (count / 4).max(1),
                Err(PollError::InvalidOffset) => {
                    // ...and step over it if it is not past the end (InvalidOffset is also
                    // the answer for an offset past the end of a partition).
                    let end = self.high_watermark(topic, partition).await?;
                    if next >= end {
                        break;
                    }
                    tracing::warn!(
                        topic,
                        partition,
                        offset = next,
                        "Iggy cannot read this message (torn by a crash?); skipping it"
                    );
                    next += 1;
                    cap = max;
                }
                Err(PollError::Log(e)) if records.is_empty() => return Err(e),
                Err(PollError::Log(_)) => break,
            }
        }
        Ok(records)
    }

    /// The offset the next record of the partition will get.
    pub(super) async fn high_watermark(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        let kept_end = self.recent.kept_end(topic, partition);
        let details = self.topic_details(topic).await?;
        let p = details
            .partitions
            .iter()
            .find(|p| p.id == partition)
            .ok_or_else(|| LogError::NoSuchPartition { topic: topic.to_owned(), partition })?;
        let end = end_of(p);
        // Made again since it was read (a reader that sees the end move back reads it from
        // the start): what is kept of it is another topic's.
        self.recent.check_end(topic, kept_end, end);
        Ok(end)
    }

    /// One poll request of `count` messages from `from`.
    async fn poll_once(&self, topic: &str, partition: u32, from: u64, count: u32) -> Result<Vec<Record>, PollError> {
        self.health.need_connection().map_err(LogError::from)?;
        let consumer = Consumer::new(ident("owlery")?);
        let topic_id = ident(topic)?;
        let strategy = PollingStrategy::offset(from);
        let poller = self.poller();
        let request =
            poller.poll_messages(&self.stream, &topic_id, Some(partition), &consumer, &strategy, count, false);
        let polled = match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(Ok(polled)) => polled,
            Ok(Err(IggyError::Unauthenticated)) => {
                // Reconnected by the client after a server restart, but signed out.
                let _ = connect_signed_in(poller, &self.settings).await;
                return Err(LogError::from(IggyError::Unauthenticated).into());
            }
            Ok(Err(e)) => return Err(self.poll_failed(e, topic, partition)),
            Err(_) => return Err(LogError::from(Unavailable::NoAnswer(REQUEST_TIMEOUT)).into()),
        };
        Ok(polled
            .messages
            .into_iter()
            .filter(|m| m.header.offset >= from)
            .map(|m| Record { partition, offset: m.header.offset, payload: m.payload })
            .collect())
    }

    fn poll_failed(&self, error: IggyError, topic: &str, partition: u32) -> PollError {
        match error {
            IggyError::TopicIdNotFound(..) | IggyError::TopicNameNotFound(..) => {
                PollError::Log(LogError::NoSuchTopic(topic.to_owned()))
            }
            // Right after a topic is made, another connection (another of Iggy's shards) can
            // briefly not know its partitions yet: that is a wait, not an answer.
            IggyError::PartitionNotFound(..)
                if partition < self.known_partitions(topic).unwrap_or_else(|| self.settings.partitions_of(topic)) =>
            {
                PollError::Log(Unavailable::NotShownYet { topic: topic.to_owned(), partition }.into())
            }
            IggyError::PartitionNotFound(..) => {
                PollError::Log(LogError::NoSuchPartition { topic: topic.to_owned(), partition })
            }
            IggyError::InvalidOffset(_) => PollError::InvalidOffset,
            e => PollError::Log(e.into()),
        }
    }
}
