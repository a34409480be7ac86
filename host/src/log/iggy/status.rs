//! The connection's health as the background tasks see it, and what
//! `GET /api/monitoring/iggy-status` shows of the Iggy backend.

use std::sync::Mutex;

use serde::Serialize;

use super::client::{Remote, end_of};
use super::spool::Spool;
use crate::log::Unavailable;

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct State {
    connected: bool,
    last_error: Option<String>,
    last_error_at: Option<String>,
    forwarded: u64,
    /// Times the connection was lost (connected, then an error).
    #[serde(skip)]
    losses: u64,
}

#[derive(Default)]
pub(super) struct Health(Mutex<State>);

impl Health {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("health lock")
    }

    pub(super) fn connected(&self) -> bool {
        self.state().connected
    }

    /// Times the connection was lost so far.
    pub(super) fn losses(&self) -> u64 {
        self.state().losses
    }

    /// Iggy answered. Returns whether it was down until now.
    pub(super) fn up(&self) -> bool {
        !std::mem::replace(&mut self.state().connected, true)
    }

    /// Iggy acknowledged `count` more forwarded events.
    pub(super) fn forwarded(&self, count: u64) {
        let mut state = self.state();
        state.forwarded += count;
        state.connected = true;
    }

    /// A request failed: the connection counts as down (logged once per new error).
    pub(super) fn failed(&self, error: &str) {
        let mut h = self.state();
        if h.connected || h.last_error.as_deref() != Some(error) {
            tracing::warn!(%error, "Iggy");
        }
        if h.connected {
            h.losses += 1;
        }
        h.connected = false;
        h.last_error = Some(error.to_owned());
        h.last_error_at = Some(crate::envelope::now_rfc3339());
    }

    /// Fail fast while Iggy is known to be down: every request made then would sit in the
    /// client's own reconnect loop, and many of them at once (one per runner and partition)
    /// race each other's reconnects; the forwarder and the tailer reconnect.
    pub(super) fn need_connection(&self) -> Result<(), Unavailable> {
        let state = self.state();
        if state.connected {
            return Ok(());
        }
        Err(state.last_error.clone().map_or(Unavailable::NotConnectedYet, Unavailable::Disconnected))
    }
}

/// The backend's status: connection, spool, and where each partition of each topic ends.
pub(super) async fn status(remote: &Remote, spool: &Spool) -> serde_json::Value {
    let health = remote.health.state().clone();
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
        "forwarded": health.forwarded,
        "topics": topics,
    })
}
