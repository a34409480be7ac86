//! A test's log that refuses what it is told to: the real embedded log, with appends
//! failing as a closure decides (neither real log refuses a single entry today; the
//! callers' defences against one that does are tested through this).

use async_trait::async_trait;
use tokio::sync::watch;

use crate::log::embedded::EmbeddedLog;
use crate::log::{AppendItem, Appended, EventLog, LogError, Record};

/// The real embedded log, except that an append fails with what `fail` answers for its
/// entries, when it answers something.
pub(crate) struct Failing<F> {
    pub(crate) log: EmbeddedLog,
    pub(crate) fail: F,
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
}

/// `Failing`, standing for a remote log shared by hosts (as Iggy is): `is_shared`, and a
/// connection-loss count the test moves (`EventLog::losses`).
pub(crate) struct SharedFailing<F> {
    pub(crate) inner: Failing<F>,
    pub(crate) losses: std::sync::atomic::AtomicU64,
}

#[async_trait]
impl<F: Fn(&[AppendItem]) -> Option<LogError> + Send + Sync + 'static> EventLog for SharedFailing<F> {
    async fn ensure_topics(&self, topics: &[String]) -> Result<(), LogError> {
        self.inner.ensure_topics(topics).await
    }
    async fn append(&self, items: Vec<AppendItem>) -> Result<Vec<Appended>, LogError> {
        self.inner.append(items).await
    }
    async fn poll(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<Record>, LogError> {
        self.inner.poll(topic, partition, from, max).await
    }
    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        self.inner.partitions(topic).await
    }
    async fn high_watermark(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.inner.high_watermark(topic, partition).await
    }
    async fn topics(&self) -> Result<Vec<String>, LogError> {
        self.inner.topics().await
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes()
    }
    fn is_shared(&self) -> bool {
        true
    }
    fn losses(&self) -> u64 {
        self.losses.load(std::sync::atomic::Ordering::Relaxed)
    }
}
