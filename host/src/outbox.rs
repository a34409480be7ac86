//! The outbox forwarder: appends what plugins committed for the log (their publishes, dead
//! letters, and on a shared log their broadcasts) to the log in order, then drops it from the
//! store. A crash in between appends the same entries again with the same ids, which the log
//! accepts once.
//!
//! Nothing in the outbox can stop it for good: an entry that cannot be read back is set
//! aside at once, and when the log refuses a round `SPLIT_AFTER` times in a row for a reason
//! other than being unavailable, the round's entries are appended one by one and each one
//! still refused is set aside (logged, counted in the status, kept in the store). Store work
//! runs off the async workers: it shares a lock with the runners' commits.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::log::{AppendItem, EventLog, LogError};
use crate::store::{Store, StoreError};

/// Entries appended per round.
const ROUND: usize = 256;
/// How long to wait before trying again after a failure, or looking again unwoken.
const RETRY: Duration = Duration::from_secs(1);
/// Refusals of one round in a row after which its entries are tried one by one.
const SPLIT_AFTER: u32 = 3;

/// Forward until `stop` is cancelled; `wake` is notified after each commit that adds entries.
pub async fn forward(store: Arc<Store>, log: Arc<dyn EventLog>, wake: Arc<Notify>, stop: CancellationToken) {
    let mut refused = Refused::default();
    while !stop.is_cancelled() {
        let pause = match round(&store, log.as_ref(), &mut refused).await {
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

/// How often in a row the round starting at `head` was refused.
#[derive(Default)]
struct Refused {
    head: u64,
    times: u32,
}

/// Run store work on a blocking thread.
async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    work: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || work(&store)).await.expect("outbox store work does not panic")
}

/// One round: `Ok(true)` when entries were forwarded or set aside, `Ok(false)` when there
/// were none.
async fn round(store: &Arc<Store>, log: &dyn EventLog, refused: &mut Refused) -> Result<bool, ()> {
    let entries = blocking(store, |s| s.outbox_peek(ROUND))
        .await
        .map_err(|error| tracing::error!(%error, "reading the outbox failed"))?;
    let Some(last) = entries.last().map(|(seq, _)| *seq) else { return Ok(false) };
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
        return Ok(true);
    }
    let head = seqs[0];
    if refused.head == head && refused.times >= SPLIT_AFTER {
        one_by_one(store, log, seqs.into_iter().zip(items).collect()).await?;
        *refused = Refused::default();
        return Ok(true);
    }
    if let Err(error) = log.append(items).await {
        if !matches!(error, LogError::Unavailable(_)) {
            refused.times = if refused.head == head { refused.times + 1 } else { 1 };
            refused.head = head;
        }
        tracing::warn!(%error, "forwarding the outbox to the log failed; retrying");
        return Err(());
    }
    *refused = Refused::default();
    if let Err(error) = blocking(store, move |s| s.outbox_remove_through(last)).await {
        tracing::error!(%error, "clearing the outbox failed");
    }
    Ok(true)
}

/// Append a refused round's entries one at a time; set aside each the log still refuses
/// (while it is unavailable, stop and try again later).
async fn one_by_one(store: &Arc<Store>, log: &dyn EventLog, entries: Vec<(u64, AppendItem)>) -> Result<(), ()> {
    for (seq, item) in entries {
        match log.append(vec![item]).await {
            Ok(_) => blocking(store, move |s| s.outbox_remove(seq))
                .await
                .map_err(|error| tracing::error!(%error, "clearing the outbox failed"))?,
            Err(error @ LogError::Unavailable(_)) => {
                tracing::warn!(%error, "forwarding the outbox to the log failed; retrying");
                return Err(());
            }
            Err(error) => set_aside(store, seq, format!("refused by the log: {error}")).await?,
        }
    }
    Ok(())
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

    use async_trait::async_trait;
    use tokio::sync::watch;

    use super::*;
    use crate::envelope::Envelope;
    use crate::log::embedded::EmbeddedLog;
    use crate::log::{Appended, Record, StorageError};
    use crate::store::BatchCommit;

    /// The real embedded log, except that it refuses, every time, any append holding an
    /// entry for topic `refused` (neither real log refuses a single entry today; this is
    /// the defence for one that does).
    struct Refusing(EmbeddedLog);

    #[async_trait]
    impl EventLog for Refusing {
        async fn ensure_topics(&self, topics: &[String]) -> Result<(), LogError> {
            self.0.ensure_topics(topics).await
        }
        async fn append(&self, items: Vec<AppendItem>) -> Result<Vec<Appended>, LogError> {
            if items.iter().any(|i| i.topic == "refused") {
                let reason = "refused for the test".to_owned();
                return Err(StorageError::Topic { topic: "refused".into(), reason }.into());
            }
            self.0.append(items).await
        }
        async fn poll(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<Record>, LogError> {
            self.0.poll(topic, partition, from, max).await
        }
        async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
            self.0.partitions(topic).await
        }
        async fn high_watermark(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
            self.0.high_watermark(topic, partition).await
        }
        async fn topics(&self) -> Result<Vec<String>, LogError> {
            self.0.topics().await
        }
        fn changes(&self) -> watch::Receiver<u64> {
            self.0.changes()
        }
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
        let log = Refusing(EmbeddedLog::open(&dir.path().join("log"), 1).unwrap());
        let outbox = vec![item("out", 0), item("refused", 1), item("out", 2)];
        store.commit_batch("p", &BatchCommit { outbox, ..BatchCommit::default() }, |_| {}).unwrap();

        let mut refused = Refused::default();
        for _ in 0..SPLIT_AFTER {
            assert!(round(&store, &log, &mut refused).await.is_err(), "the whole round is refused");
        }
        assert_eq!(store.outbox_counts().unwrap(), (3, 0), "nothing set aside yet");
        assert!(round(&store, &log, &mut refused).await.unwrap(), "then one by one");
        assert_eq!(store.outbox_counts().unwrap(), (0, 1), "only the refused one is set aside");
        let sent = log.poll("out", 0, 0, 10).await.unwrap();
        assert_eq!(sent.len(), 2, "the entries around it went out, in order");
    }
}
