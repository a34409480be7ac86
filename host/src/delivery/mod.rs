//! HTTP effects: requests plugins ask for (`send-http`), committed with their batch, then
//! delivered at least once.
//!
//! The path of one request: the runner commits it, with the batch, as an outbox entry for
//! the topic `owlery-http` (`record`), signed with the host key and marked with the host
//! that made it; the outbox forwards it to the log. Every host reads that topic (`claim`):
//! the first copy of a request id in the log is the one that counts, and the host whose
//! copy it is takes it into its pending table, in the same transaction as its read
//! position. A second host running the same plugin makes the same request under the same
//! id; its copy comes later in the same partition and is skipped by both, so one host sends
//! it. `worker` sends what is pending (timeout, retries with backoff and jitter, a limit per
//! destination, `Retry-After`), and turns a request that fails for good into an
//! `owlery.delivery_failed` dead letter. `allow` is what a manifest may allow.

pub mod allow;
pub mod claim;
pub mod record;
pub mod worker;

use serde::{Deserialize, Serialize};

pub use crate::effects::HttpRequest;

/// How a plugin's requests are delivered: the manifest's `[delivery]` table, copied into
/// each request when it is made (a later manifest does not change requests already made).
/// Unknown fields are ignored, not refused: this travels in request records and the
/// pending table, which hosts of other versions read (the manifest refuses unknown keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    /// Attempts in all, the first one included; then the request is a dead letter.
    pub attempts: u32,
    /// Deadline of one attempt: connecting, sending and the answer's status line.
    pub timeout_ms: u64,
    /// Wait after the first failed attempt; doubled after each, with jitter.
    pub backoff_ms: u64,
    /// The longest wait between attempts (a `Retry-After` may ask for up to an hour).
    pub max_backoff_ms: u64,
    /// Requests of the plugin waiting to be delivered at most; more become dead letters
    /// at once, so a receiver down for days cannot fill the host's disk.
    pub max_pending: u64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy { attempts: 12, timeout_ms: 10_000, backoff_ms: 1_000, max_backoff_ms: 300_000, max_pending: 10_000 }
    }
}

impl Policy {
    /// Each setting's allowed range: `(key, value, low, high)`.
    pub fn ranges(&self) -> [(&'static str, u64, u64, u64); 5] {
        [
            ("attempts", u64::from(self.attempts), 1, 100),
            ("timeout_ms", self.timeout_ms, 1, 600_000),
            ("backoff_ms", self.backoff_ms, 1, 3_600_000),
            ("max_backoff_ms", self.max_backoff_ms, 1, 86_400_000),
            ("max_pending", self.max_pending, 1, 10_000_000),
        ]
    }
}

/// The largest request body a plugin may send. A request travels through the log as one
/// record, its body in base64, so this keeps every record well inside what either log takes
/// (a record the log refused would be a request lost).
pub const MAX_BODY: usize = 1 << 20;

/// The longest `Retry-After` honoured: a receiver cannot park a request for days.
pub const MAX_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// What `GET /api/plugins/{name}` shows of a plugin's requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpCounts {
    /// Taken in and not yet delivered or given up.
    pub pending: u64,
    pub delivered: u64,
    /// Given up on: dead letters of type `owlery.delivery_failed`.
    pub failed: u64,
    /// The last failed attempt's error (the destination, never the full URL).
    pub last_error: Option<String>,
}
