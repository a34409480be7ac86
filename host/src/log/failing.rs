//! A test's log that refuses what it is told to: the real embedded log, with appends
//! failing as a closure decides, local or standing for a shared one (neither real log refuses a single entry today; the
//! callers' defences against one that does are tested through this).

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::log::embedded::EmbeddedLog;
use crate::log::{AppendItem, Appended, EventLog, LogError, Record};

/// The real embedded log, except that an append fails with what `fail` answers for its
/// entries, when it answers something. With `losses`, it stands for a remote log shared by
/// hosts (as Iggy is): `is_shared`, and a connection-loss count the test moves.
pub(crate) struct Failing<F> {
    pub(crate) log: EmbeddedLog,
    pub(crate) fail: F,
    pub(crate) losses: Option<AtomicU64>,
}

impl<F> Failing<F> {
    /// A local log.
    pub(crate) fn local(log: EmbeddedLog, fail: F) -> Self {
        Failing { log, fail, losses: None }
    }

    /// A shared log, no connection lost yet.
    pub(crate) fn shared(log: EmbeddedLog, fail: F) -> Self {
        Failing { log, fail, losses: Some(AtomicU64::new(0)) }
    }
}

#[async_trait]
impl<F: Fn(&[AppendItem]) -> Option<LogError> + Send + Sync + 'static> EventLog for Failing<F> {
    async fn ensure_topics(&self, topics: &[String]) -> Result<(), LogError> {
        self.log.ensure_topics(topics).await
    }
    async fn append(&self, items: Vec<AppendItem>) -> Result<Vec<Appended>, LogError> {
        if let Some(error) = (self.fail)(items.as_slice()) {
            return Err(error);
        }
        self.log.append(items).await
    }
    async fn poll(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<Record>, LogError> {
        self.log.poll(topic, partition, from, max).await
    }
    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        self.log.partitions(topic).await
    }
    async fn high_watermark(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.log.high_watermark(topic, partition).await
    }
    async fn topics(&self) -> Result<Vec<String>, LogError> {
        self.log.topics().await
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.log.changes()
    }
    fn is_shared(&self) -> bool {
        self.losses.is_some()
    }
    fn losses(&self) -> u64 {
        self.losses.as_ref().map_or(0, |l| l.load(Ordering::Relaxed))
    }
}
