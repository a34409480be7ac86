//! Where an event goes: the routing table maps event-type patterns to a topic and a
//! partition key. The key is a list of fields tried in turn (`["data.id",
//! "data.incidentId", "userId"]`); events with the same key land in the same partition, so
//! they are read, handled and broadcast in the order they were published. The catalog's
//! default keys every incident event by its incident, presence by its user.
//!
//! `owlery.toml`'s `[routing]` table adds routes, tried before the catalog's, and renames the
//! catalog's incident and presence topics (`IGGY_INCIDENT_TOPIC`, `IGGY_PRESENCE_TOPIC`).

use serde::Deserialize;
use serde_json::Value;

use crate::envelope::{Envelope, Pattern, check_topic};

/// The catalog's topic for incident, comment and severity events.
pub const INCIDENT_TOPIC: &str = "incident-events";
/// The catalog's topic for presence events.
pub const PRESENCE_TOPIC: &str = "presence-events";
/// Where events no route matches go.
pub const FALLBACK_TOPIC: &str = "events";

/// One field of an envelope a partition key may be taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyField {
    EventId,
    /// A top-level field (`userId`, `source`, `eventType`, or one the producer added).
    Top(String),
    /// A path inside `data` or `metadata`: `data.incident.id`.
    Data(Vec<String>),
    Metadata(Vec<String>),
}

impl KeyField {
    fn parse(text: &str) -> Result<KeyField, String> {
        let mut parts = text.split('.');
        let first = parts.next().unwrap_or_default();
        let rest: Vec<String> = parts.map(str::to_owned).collect();
        if text.is_empty() || rest.iter().any(String::is_empty) || first.is_empty() {
            return Err(format!("{text:?} is not a field like \"userId\" or \"data.incidentId\""));
        }
        Ok(match (first, rest.is_empty()) {
            ("eventId", true) => KeyField::EventId,
            ("data", false) => KeyField::Data(rest),
            ("metadata", false) => KeyField::Metadata(rest),
            // Objects: never a key. A path into them is.
            ("data" | "metadata", true) => {
                return Err(format!("{text:?} is an object: name a field in it ({text}.id)"));
            }
            (_, true) => KeyField::Top(first.to_owned()),
            _ => return Err(format!("{text:?}: only data.… and metadata.… fields have paths")),
        })
    }

    /// The field's value as key text: a non-empty string as it is, a number as written;
    /// anything else (missing, null, an object) does not count.
    fn value(&self, envelope: &Envelope) -> Option<String> {
        let value = match self {
            KeyField::EventId => return Some(envelope.event_id.to_string()),
            KeyField::Top(name) => match name.as_str() {
                "userId" => return envelope.user_id.clone().filter(|u| !u.is_empty()),
                "source" => return Some(envelope.source.clone()),
                "eventType" => return Some(envelope.event_type.clone()),
                "timestamp" => return Some(envelope.timestamp.clone()),
                other => envelope.extra.get(other)?,
            },
            KeyField::Data(path) => walk(&envelope.data, path)?,
            KeyField::Metadata(path) => walk(envelope.metadata.get(&path[0])?, &path[1..])?,
        };
        match value {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

fn walk<'v>(mut value: &'v Value, path: &[String]) -> Option<&'v Value> {
    for part in path {
        value = value.get(part)?;
    }
    Some(value)
}

/// One row of the table: event types matching `pattern` go to `topic`, partitioned by the
/// first field of `key` the event has (its `eventId` when none).
#[derive(Debug, Clone)]
pub struct Route {
    pattern: Pattern,
    topic: String,
    key: Vec<KeyField>,
}

impl Route {
    fn new(pattern: &str, topic: &str, key: &[&str]) -> Route {
        Route {
            pattern: Pattern::new(pattern),
            topic: topic.to_owned(),
            key: key.iter().map(|f| KeyField::parse(f).expect("the catalog's key fields parse")).collect(),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition key of `envelope` under this route.
    pub fn key_of(&self, envelope: &Envelope) -> String {
        self.key.iter().find_map(|field| field.value(envelope)).unwrap_or_else(|| envelope.event_id.to_string())
    }
}

/// `[[routing.routes]]` in owlery.toml. `topic` and `key` left out are the catalog's for
/// the pattern.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub pattern: String,
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default)]
    pub key: Option<Vec<String>>,
}

/// The `[routing]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// The catalog's topic for incident, comment and severity events.
    pub incident_topic: String,
    /// The catalog's topic for presence events.
    pub presence_topic: String,
    /// Routes tried before the catalog's, first match wins.
    pub routes: Vec<RouteConfig>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            incident_topic: INCIDENT_TOPIC.to_owned(),
            presence_topic: PRESENCE_TOPIC.to_owned(),
            routes: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("routing: {0}")]
pub struct RoutingError(String);

/// Maps event types to topics and partition keys; the first matching route wins.
#[derive(Debug, Clone)]
pub struct Routing {
    routes: Vec<Route>,
    fallback: Route,
}

impl Default for Routing {
    fn default() -> Self {
        Routing::catalog(INCIDENT_TOPIC, PRESENCE_TOPIC)
    }
}

impl Routing {
    /// The product's catalog. One incident's events (created, updated, resolved, deleted,
    /// its comments and escalations) share its id as their key, whoever sends them; a
    /// comment's own `data.id` is not its incident's, so comments look at `incidentId` first.
    pub fn catalog(incident_topic: &str, presence_topic: &str) -> Routing {
        let incident = ["data.id", "data.incidentId", "userId"];
        let about_incident = ["data.incidentId", "data.id", "userId"];
        let user = ["userId", "data.userId"];
        let route = Route::new;
        Routing {
            routes: vec![
                route("incident.*", incident_topic, &incident),
                route("comment.*", incident_topic, &about_incident),
                route("severity.*", incident_topic, &about_incident),
                route("user.connected", presence_topic, &user),
                route("user.disconnected", presence_topic, &user),
                route("user.joined_room", presence_topic, &user),
                route("user.left_room", presence_topic, &user),
                route("presence.*", presence_topic, &user),
                route("user.logged_in", "auth-events", &user),
                route("user.logged_out", "auth-events", &user),
                route("user.registered", "auth-events", &user),
                route("token.*", "auth-events", &user),
                route("alert.*", "alert-events", &["data.incidentId", "userId"]),
            ],
            fallback: route("*", FALLBACK_TOPIC, &["userId"]),
        }
    }

    /// The catalog with `config`'s topics, and its routes tried first.
    pub fn from_config(config: &RoutingConfig) -> Result<Routing, RoutingError> {
        for (what, topic) in [("incident_topic", &config.incident_topic), ("presence_topic", &config.presence_topic)] {
            check_route_topic(topic).map_err(|e| RoutingError(format!("{what}: {e}")))?;
        }
        let catalog = Routing::catalog(&config.incident_topic, &config.presence_topic);
        let mut routes = Vec::with_capacity(config.routes.len() + catalog.routes.len());
        for (index, wanted) in config.routes.iter().enumerate() {
            let at = |e: String| RoutingError(format!("routes[{index}] ({:?}): {e}", wanted.pattern));
            crate::envelope::check_event_pattern(&wanted.pattern).map_err(at)?;
            // What the catalog does with the pattern, for the parts left out.
            let base = catalog.route(wanted.pattern.trim_end_matches('*'));
            let topic = wanted.topic.clone().unwrap_or_else(|| base.topic.clone());
            check_route_topic(&topic).map_err(|e| at(format!("topic: {e}")))?;
            let key = match &wanted.key {
                None => base.key.clone(),
                Some(fields) if fields.is_empty() => return Err(at("key: name at least one field".into())),
                Some(fields) => fields.iter().map(|f| KeyField::parse(f)).collect::<Result<_, _>>().map_err(at)?,
            };
            routes.push(Route { pattern: Pattern::new(wanted.pattern.clone()), topic, key });
        }
        routes.extend(catalog.routes);
        Ok(Routing { routes, fallback: catalog.fallback })
    }

    /// The route `event_type` takes.
    pub fn route(&self, event_type: &str) -> &Route {
        self.routes.iter().find(|r| r.pattern.matches(event_type)).unwrap_or(&self.fallback)
    }

    pub fn topic_for(&self, event_type: &str) -> &str {
        &self.route(event_type).topic
    }

    /// Every topic the table can route to.
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self.routes.iter().map(|r| r.topic.clone()).collect();
        topics.push(self.fallback.topic.clone());
        topics.sort();
        topics.dedup();
        topics
    }
}

fn check_route_topic(topic: &str) -> Result<(), String> {
    check_topic(topic)?;
    if crate::topics::is_internal(topic) {
        return Err(format!("{topic:?} is one of Owlery's own topics"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn envelope(value: Value) -> Envelope {
        Envelope::from_producer(value).unwrap()
    }

    #[test]
    fn routes_by_the_catalog() {
        let r = Routing::default();
        assert_eq!(r.topic_for("incident.created"), "incident-events");
        assert_eq!(r.topic_for("severity.escalated"), "incident-events");
        assert_eq!(r.topic_for("user.joined_room"), "presence-events");
        assert_eq!(r.topic_for("presence.connected"), "presence-events");
        assert_eq!(r.topic_for("token.refreshed"), "auth-events");
        assert_eq!(r.topic_for("billing.paid"), "events");
    }

    #[test]
    fn one_incidents_events_share_a_key_whoever_sends_them() {
        let r = Routing::default();
        let key = |value: Value| {
            let e = envelope(value);
            r.route(&e.event_type).key_of(&e)
        };
        let keys = [
            key(json!({"eventType": "incident.created", "userId": "u1", "data": {"id": 42}})),
            key(json!({"eventType": "incident.updated", "userId": "u2", "data": {"id": "42"}})),
            key(json!({"eventType": "incident.resolved", "userId": "u3", "data": {"incidentId": 42}})),
            key(json!({"eventType": "comment.added", "userId": "u1", "data": {"id": "c-9", "incidentId": 42}})),
            key(json!({"eventType": "severity.escalated", "data": {"incidentId": "42"}})),
        ];
        assert!(keys.iter().all(|k| k == "42"), "{keys:?}");
        // Without an incident id: the user, then the event.
        assert_eq!(key(json!({"eventType": "incident.updated", "userId": "u7", "data": {}})), "u7");
        let e = envelope(json!({"eventType": "incident.updated", "data": {"id": null}}));
        assert_eq!(r.route(&e.event_type).key_of(&e), e.event_id.to_string());
        assert_eq!(key(json!({"eventType": "user.connected", "data": {"userId": "u5"}})), "u5");
    }

    #[test]
    fn configured_routes_come_first_and_keep_what_they_leave_out() {
        let config: RoutingConfig = toml::from_str(
            r#"
            incident_topic = "incidents"
            [[routes]]
            pattern = "billing.*"
            topic = "billing"
            key = ["metadata.tenant.id", "data.account", "tenant"]
            [[routes]]
            pattern = "incident.*"
            key = ["source"]
            "#,
        )
        .unwrap();
        let r = Routing::from_config(&config).unwrap();
        assert_eq!(r.topic_for("incident.created"), "incidents");
        assert_eq!(r.topic_for("comment.added"), "incidents");
        assert_eq!(r.topic_for("user.connected"), "presence-events");
        let billing = envelope(json!({"eventType": "billing.paid", "metadata": {"tenant": {"id": 7}}, "tenant": "t"}));
        assert_eq!(r.route("billing.paid").topic(), "billing");
        assert_eq!(r.route("billing.paid").key_of(&billing), "7");
        let extra = envelope(json!({"eventType": "billing.paid", "tenant": "t"}));
        assert_eq!(r.route("billing.paid").key_of(&extra), "t");
        let incident = envelope(json!({"eventType": "incident.created", "source": "mobile", "data": {"id": 1}}));
        assert_eq!(r.route("incident.created").key_of(&incident), "mobile");
        assert!(r.topics().contains(&"billing".to_owned()) && !r.topics().contains(&"incident-events".to_owned()));
    }

    #[test]
    fn bad_routes_are_refused_naming_the_route() {
        let refused = |text: &str| {
            let config: RoutingConfig = toml::from_str(text).unwrap();
            Routing::from_config(&config).unwrap_err().to_string()
        };
        let error = refused("[[routes]]\npattern = \"a.*\"\ntopic = \"dead-letters\"\n");
        assert!(error.contains("routes[0]") && error.contains("Owlery's own"), "{error}");
        let error = refused("[[routes]]\npattern = \"a.*\"\nkey = [\"data.\"]\n");
        assert!(error.contains("data."), "{error}");
        let error = refused("[[routes]]\npattern = \"a.*\"\nkey = []\n");
        assert!(error.contains("at least one field"), "{error}");
        let error = refused("[[routes]]\npattern = \"a b\"\n");
        assert!(error.contains("routes[0]"), "{error}");
        let error = refused("presence_topic = \"no spaces\"\n");
        assert!(error.contains("presence_topic"), "{error}");
        let error = refused("[[routes]]\npattern = \"a.*\"\nkey = [\"userId.x\"]\n");
        assert!(error.contains("paths"), "{error}");
        let error = refused("[[routes]]\npattern = \"a.*\"\nkey = [\"data\"]\n");
        assert!(error.contains("is an object"), "{error}");
    }
}
