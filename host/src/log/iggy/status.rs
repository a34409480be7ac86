//! What `GET /api/monitoring/iggy-status` shows of the Iggy backend.

use super::client::{Remote, end_of};
use super::spool::Spool;

/// The backend's status: connection, spool, and where each partition of each topic ends.
pub(super) async fn status(remote: &Remote, spool: &Spool) -> serde_json::Value {
    let health = remote.health.snapshot();
    let mut topics = serde_json::Map::new();
    if health.connected {
        for name in remote.topic_names() {
            if let Ok(details) = remote.topic_details(&name).await {
                let partitions: serde_json::Map<String, serde_json::Value> =
                    details.partitions.iter().map(|p| (p.id.to_string(), end_of(p).into())).collect();
                topics.insert(name, partitions.into());
            }
        }
    }
    serde_json::json!({
        "backend": "iggy",
        "address": remote.settings.address,
        "stream": remote.settings.stream,
        "connected": health.connected,
        "lastError": health.last_error,
        "lastErrorAt": health.last_error_at,
        "spoolDepth": spool.depth(),
        "spool": {"pending": spool.depth(), "setAside": spool.set_aside_count()},
        "forwarded": health.forwarded,
        "topics": topics,
    })
}
