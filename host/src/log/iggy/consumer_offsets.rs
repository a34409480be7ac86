//! Stores each plugin's offsets in Iggy (consumer `owlery-{plugin}`) so Iggy's own tools
//! show its lag. Best effort, in the background: Owlery's store stays the source of truth.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iggy::prelude::{Consumer, ConsumerOffsetClient, Identifier};

use super::client::{Remote, answered};

/// (consumer, topic, partition) → next offset, not stored in Iggy yet
#[derive(Default)]
pub(super) struct ConsumerOffsets(Mutex<HashMap<(String, String, u32), u64>>);

impl ConsumerOffsets {
    /// Plugin `consumer` committed `next` as its next offset.
    pub(super) fn note(&self, consumer: &str, topic: &str, partition: u32, next: u64) {
        let mut pending = self.0.lock().expect("offsets lock");
        pending.insert((format!("owlery-{consumer}"), topic.to_owned(), partition), next);
    }

    fn take(&self) -> Vec<((String, String, u32), u64)> {
        std::mem::take(&mut *self.0.lock().expect("offsets lock")).into_iter().collect()
    }
}

/// Every second, store what was noted since.
pub(super) async fn record(remote: Arc<Remote>, pending: Arc<ConsumerOffsets>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for ((consumer, topic, partition), next) in pending.take() {
            let (Ok(consumer_id), Ok(topic_id)) = (Identifier::named(&consumer), Identifier::named(&topic)) else {
                continue;
            };
            // Iggy stores the last consumed offset.
            let Some(last) = next.checked_sub(1) else { continue };
            let consumer_id = Consumer::new(consumer_id);
            let request =
                remote.client.store_consumer_offset(&consumer_id, &remote.stream, &topic_id, Some(partition), last);
            if let Err(error) = answered(request).await {
                tracing::debug!(%consumer, %topic, partition, %error, "storing a consumer offset in Iggy failed");
            }
        }
    }
}
