//! The connection's health as the background tasks see it: up or down, the last error,
//! how often it was lost, and how many events were forwarded.

use std::sync::Mutex;

use crate::log::Unavailable;

#[derive(Debug, Default, Clone)]
pub(super) struct State {
    pub(super) connected: bool,
    pub(super) last_error: Option<String>,
    pub(super) last_error_at: Option<String>,
    pub(super) forwarded: u64,
    /// Times the connection was lost (connected, then an error).
    pub(super) losses: u64,
}

#[derive(Default)]
pub(super) struct Health(Mutex<State>);

impl Health {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("health lock")
    }

    /// All of it, as of now.
    pub(super) fn snapshot(&self) -> State {
        self.state().clone()
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

    /// Iggy acknowledged `count` more forwarded events, but the request that followed
    /// failed: counted, without saying the connection is up.
    pub(super) fn counted(&self, count: u64) {
        self.state().forwarded += count;
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
