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
    topic == DEAD_LETTERS || is_host_only(topic)
}

/// Internal topics no plugin may read even by name: `owlery-http` carries every plugin's
/// requests with their headers (a webhook's secret), `owlery-fanout` every host's
/// broadcasts to every room. Dead letters are meant to be read by a plugin that asks.
pub fn is_host_only(topic: &str) -> bool {
    topic == FANOUT || topic == HTTP
}

/// A dead letter (`event_type`: a `DEAD_LETTER_TYPE` or a `DELIVERY_FAILED_TYPE`) of
/// `plugin`, in topic `dead-letters`, keyed by its id. The id is derived by the caller from
/// what failed, so the same failure written again is accepted once.
pub fn dead_letter(
    event_id: uuid::Uuid,
    event_type: &str,
    plugin: &str,
    data: serde_json::Value,
) -> crate::log::AppendItem {
    let envelope = crate::envelope::Envelope {
        event_id,
        event_type: event_type.to_owned(),
        timestamp: crate::envelope::now_rfc3339(),
        source: format!("plugin:{plugin}"),
        user_id: None,
        metadata: serde_json::Map::new(),
        data,
        extra: serde_json::Map::new(),
    };
    crate::log::AppendItem { topic: DEAD_LETTERS.to_owned(), key: event_id.to_string(), envelope }
}
