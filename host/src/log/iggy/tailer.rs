//! Notices messages written by other Iggy clients and wakes the readers; also keeps the
//! connection state honest (a request stuck in the client's reconnect loop counts as down).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use iggy::prelude::{Identifier, IggyError, StreamClient, TopicClient};
use tokio::sync::watch;

use super::client::{Remote, connect_signed_in, end_of};

/// How often the stream is looked at.
const EVERY: Duration = Duration::from_millis(50);
/// Looks after which every topic's partition ends are read again, changed or not (1 s).
const REREAD_EVERY: u64 = 20;
/// How long one look may take.
const LOOK_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) async fn run(remote: Arc<Remote>, changes: watch::Sender<u64>) {
    // topic → messages it held at the last look
    let mut counts: HashMap<String, u64> = HashMap::new();
    // topic → when it was made, as first seen
    let mut made: HashMap<String, u64> = HashMap::new();
    let mut tick: u64 = 0;
    loop {
        tokio::time::sleep(EVERY).await;
        tick += 1;
        let details = match tokio::time::timeout(LOOK_TIMEOUT, remote.reader.get_stream(&remote.stream)).await {
            Ok(Ok(Some(details))) => details,
            // The stream is not created yet: the forwarder is on it.
            Ok(Ok(None)) => continue,
            Ok(Err(e)) => {
                remote.recent.clear();
                remote.health.failed(&e.to_string());
                if matches!(e, IggyError::Unauthenticated) {
                    let _ = connect_signed_in(&remote.reader, &remote.settings).await;
                }
                continue;
            }
            Err(_) => {
                remote.recent.clear();
                remote.health.failed("Iggy did not answer within 1 s");
                continue;
            }
        };
        remote.health.up();
        let mut moved = false;
        for topic in details.topics {
            // Made again (deleted, or purged, and made anew): its offsets start over.
            let created = topic.created_at.as_micros();
            if made.insert(topic.name.clone(), created).is_some_and(|before| before != created)
                || counts.get(&topic.name).is_some_and(|&before| topic.messages_count < before)
            {
                remote.recent.forget(&topic.name);
            }
            // Where its partitions end: read when it changed, and every second anyway.
            if counts.get(&topic.name) == Some(&topic.messages_count) && !tick.is_multiple_of(REREAD_EVERY) {
                continue;
            }
            moved |= counts.insert(topic.name.clone(), topic.messages_count) != Some(topic.messages_count);
            moved |= read_ends(&remote, &topic.name, topic.partitions_count).await;
        }
        if moved {
            changes.send_modify(|n| *n += 1);
        }
    }
}

/// Read where the topic's partitions end; returns whether any moved.
async fn read_ends(remote: &Remote, topic: &str, partitions: u32) -> bool {
    let Ok(id) = Identifier::named(topic) else { return false };
    let generations: Vec<u64> = {
        let ends = remote.ends();
        (0..partitions).map(|p| ends.generation(topic, p)).collect()
    };
    let kept_ends: Vec<Option<u64>> = (0..partitions).map(|p| remote.recent.kept_end(topic, p)).collect();
    let looked = tokio::time::timeout(LOOK_TIMEOUT, remote.reader.get_topic(&remote.stream, &id)).await;
    let Ok(Ok(Some(details))) = looked else { return false };
    let mut ends = remote.ends();
    let mut moved = false;
    for partition in &details.partitions {
        // Ending before what was kept of it: made again between two looks.
        let kept_end = kept_ends.get(partition.id as usize).copied().flatten();
        remote.recent.check_end(topic, kept_end, end_of(partition));
        let generation = generations.get(partition.id as usize).copied().unwrap_or(0);
        moved |= ends.read(topic, partition.id, end_of(partition), generation);
    }
    moved
}
