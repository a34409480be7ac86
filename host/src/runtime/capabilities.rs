//! What a plugin may do, from its manifest, and the refusals a host import gives when a
//! plugin reaches past it. A plugin can never grant itself anything.

use super::limits::CallLimits;
use crate::envelope::Pattern;

/// What a plugin may do, from its manifest.
#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    pub broadcast: bool,
    pub publish: Vec<Pattern>,
    pub state: bool,
    /// Where HTTP requests may go (none: no `send-http`).
    pub http: Vec<crate::delivery::allow::UrlPattern>,
    /// How the plugin's HTTP requests are delivered.
    pub delivery: crate::delivery::Policy,
    /// What one call may take from the host.
    pub limits: CallLimits,
}

/// Why a host import refused a plugin. `NoState` and `ReadOnly` end the call (the plugin
/// broke its contract); the others are answered to the guest as an error it may handle.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refusal {
    #[error("plugin {0} has no `state` capability in its manifest")]
    NoState(String),
    #[error("{0} is not allowed outside `handle`")]
    ReadOnly(&'static str),

    #[error("this plugin has no `broadcast` capability in its manifest")]
    NoBroadcast,
    #[error("the manifest does not allow publishing {0:?}")]
    NotPublishable(String),
    #[error("room names are 1 to 256 characters")]
    RoomName,
    #[error("{0} must be JSON")]
    NotJson(&'static str),
    #[error("{0}")]
    Shape(String),
    #[error("event type: {0}")]
    EventType(String),
    #[error("cause {0:?} is not an event of the current batch")]
    UnknownCause(String),
    #[error("{0}")]
    Http(String),
}

impl Capabilities {
    pub(super) fn need_state(&self, plugin: &str) -> Result<(), Refusal> {
        if self.state { Ok(()) } else { Err(Refusal::NoState(plugin.to_owned())) }
    }

    pub(super) fn need_broadcast(&self) -> Result<(), Refusal> {
        if self.broadcast { Ok(()) } else { Err(Refusal::NoBroadcast) }
    }

    pub(super) fn need_publish(&self, event_type: &str) -> Result<(), Refusal> {
        if self.publish.iter().any(|p| p.matches(event_type)) {
            Ok(())
        } else {
            Err(Refusal::NotPublishable(event_type.to_owned()))
        }
    }
}
