//! The topics Owlery itself writes, which producers and plugin subscriptions leave alone.
//!
//! One place for these names so that ingress, the runners and the server agree on them;
//! the log backends never need to know what they are for.

/// The topic failed events go to, as `owlery.dead_letter` events.
pub const DEAD_LETTERS: &str = "dead-letters";
/// The event type of a dead letter.
pub const DEAD_LETTER_TYPE: &str = "owlery.dead_letter";
/// The event type of a dead letter for an HTTP request given up on.
pub const DELIVERY_FAILED_TYPE: &str = "owlery.delivery_failed";
/// The shared fan-out log on Iggy: every host's broadcasts, one partition, in order.
pub const FANOUT: &str = "owlery-fanout";

/// Plugins' HTTP requests on their way to being sent (see `delivery`).
pub const HTTP: &str = "owlery-http";

/// Topics only the host writes: no default subscription includes them.
pub fn is_internal(topic: &str) -> bool {
    topic == DEAD_LETTERS || topic == FANOUT || topic == HTTP
}
