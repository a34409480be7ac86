//! The runner's one door to the event log. A runner is a plain thread and the log's
//! contract is async (a remote log can wait on the network), so this adapter blocks on
//! the host's tokio runtime: the only `block_on` of the runner is here.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::offsets::TopicPartition;
use crate::log::{EventLog, LogError, Record};

/// What ended a `wait`.
pub enum Wake<T> {
    /// The log changed, or the time was up: look again.
    Look,
    Command(T),
    /// Every sender is gone: nobody will ask anything again.
    Closed,
}

#[derive(Clone)]
pub struct LogAccess {
    log: Arc<dyn EventLog>,
    tokio: tokio::runtime::Handle,
}

impl LogAccess {
    pub fn new(log: Arc<dyn EventLog>, tokio: tokio::runtime::Handle) -> Self {
        LogAccess { log, tokio }
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.tokio.block_on(future)
    }

    pub fn ensure_topics(&self, topics: &[String]) -> Result<(), LogError> {
        self.block_on(self.log.ensure_topics(topics))
    }

    pub fn topics(&self) -> Result<Vec<String>, LogError> {
        self.block_on(self.log.topics())
    }

    pub fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        self.block_on(self.log.partitions(topic))
    }

    pub fn high_watermark(&self, tp: &TopicPartition) -> Result<u64, LogError> {
        self.block_on(self.log.high_watermark(&tp.topic, tp.partition))
    }

    pub fn poll(&self, tp: &TopicPartition, from: u64, max: usize) -> Result<Vec<Record>, LogError> {
        self.block_on(self.log.poll(&tp.topic, tp.partition, from, max))
    }

    /// Several reads `(partition, from, max)` at once: one round trip on a remote log, not
    /// one per partition. The results come in the order of `reads`.
    pub fn poll_many(&self, reads: &[(&TopicPartition, u64, usize)]) -> Vec<Result<Vec<Record>, LogError>> {
        let log = &self.log;
        let reads = reads.iter().map(|(tp, from, max)| log.poll(&tp.topic, tp.partition, *from, *max));
        self.block_on(futures_util::future::join_all(reads))
    }

    /// A counter that changes whenever anything is appended.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.log.changes()
    }

    pub fn note_consumer_offset(&self, consumer: &str, topic: &str, partition: u32, next: u64) {
        self.log.note_consumer_offset(consumer, topic, partition, next);
    }

    /// Wait until the log changes, a command arrives or `timeout` has passed.
    pub fn wait<T>(
        &self,
        changes: &mut watch::Receiver<u64>,
        commands: &mut mpsc::UnboundedReceiver<T>,
        timeout: Duration,
    ) -> Wake<T> {
        self.block_on(async {
            tokio::select! {
                _ = changes.changed() => Wake::Look,
                command = commands.recv() => command.map_or(Wake::Closed, Wake::Command),
                _ = tokio::time::sleep(timeout) => Wake::Look,
            }
        })
    }
}
