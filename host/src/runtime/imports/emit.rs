//! The `broadcast`, `publish` and `send-http` capabilities: what a plugin emits because of
//! an event of its batch, checked against its manifest and buffered until the call succeeds. Each gets
//! an id derived from the plugin, the cause and a counter, so the same batch handled again
//! (a retry, a redelivery, another host) emits the same ids; they are keyed with the host's
//! secret (see `keys`), so a producer cannot publish an event under an id in advance.

use std::collections::HashMap;
use std::sync::Arc;

use super::GuestEnvelope;
use crate::delivery::allow;
use crate::effects::{Broadcast, HttpRequest};
use crate::envelope::{Envelope, check_event_type, check_json_shape};
use crate::keys::HostKey;
use crate::log::AppendItem;
use crate::routing::Routing;
use crate::runtime::capabilities::{Capabilities, Refusal};

/// An event of the batch being handled, as a `cause` of publishes and broadcasts.
struct Cause {
    timestamp: String,
    event_type: String,
    /// Events published for it so far.
    published: u32,
    /// Broadcasts made for it so far.
    broadcast: u32,
    /// HTTP requests made for it so far.
    http: u32,
}

/// What a plugin made because of an event of its batch.
#[derive(Clone, Copy)]
enum Effect {
    Publish,
    Broadcast,
    Http,
}

/// One instance's broadcasts and publishes for the call being served.
pub(super) struct Emitter {
    plugin: Arc<str>,
    routing: Arc<Routing>,
    /// Makes the ids: the same on every host sharing the log, unpredictable to producers.
    key: HostKey,
    /// The batch being handled (empty outside `handle`).
    batch: Arc<[GuestEnvelope]>,
    /// eventId → what was published and broadcast for it, for the batch being handled;
    /// made on the first publish or broadcast (most batches of most plugins make none).
    causes: HashMap<String, Cause>,
    broadcasts: Vec<Broadcast>,
    publishes: Vec<AppendItem>,
    requests: Vec<HttpRequest>,
}

/// What one call emitted.
pub(super) struct Emitted {
    pub broadcasts: Vec<Broadcast>,
    pub publishes: Vec<AppendItem>,
    pub requests: Vec<HttpRequest>,
}

impl Emitter {
    pub(super) fn new(plugin: Arc<str>, routing: Arc<Routing>, key: HostKey) -> Emitter {
        Emitter {
            plugin,
            routing,
            key,
            batch: Arc::new([]),
            causes: HashMap::new(),
            broadcasts: Vec::new(),
            publishes: Vec::new(),
            requests: Vec::new(),
        }
    }

    /// A `handle` of `batch` starts: nothing emitted yet.
    pub(super) fn begin(&mut self, batch: Arc<[GuestEnvelope]>) {
        self.batch = batch;
        self.causes.clear();
        self.broadcasts.clear();
        self.publishes.clear();
        self.requests.clear();
    }

    /// The call is over: what it emitted, and the batch forgotten.
    pub(super) fn finish(&mut self) -> Emitted {
        self.batch = Arc::new([]);
        Emitted {
            broadcasts: std::mem::take(&mut self.broadcasts),
            publishes: std::mem::take(&mut self.publishes),
            requests: std::mem::take(&mut self.requests),
        }
    }

    pub(super) fn send_http(
        &mut self,
        caps: &Capabilities,
        cause: String,
        request: crate::runtime::bindings::host::HttpRequest,
    ) -> Result<(), Refusal> {
        let checked =
            allow::check(&caps.http, &request.method, &request.url, &request.headers).map_err(Refusal::Http)?;
        if request.body.len() > crate::delivery::MAX_BODY {
            return Err(Refusal::Http(format!(
                "the body is {} bytes, more than the {} a request may carry",
                request.body.len(),
                crate::delivery::MAX_BODY
            )));
        }
        let (id, _) = self.derive_id(&cause, Effect::Http)?;
        self.requests.push(HttpRequest {
            id,
            method: checked.method,
            url: checked.url.into(),
            headers: request.headers,
            body: request.body,
            cause,
            policy: caps.delivery,
        });
        Ok(())
    }

    pub(super) fn broadcast(
        &mut self,
        caps: &Capabilities,
        cause: String,
        room: String,
        payload: String,
    ) -> Result<(), Refusal> {
        caps.need_broadcast()?;
        if room.is_empty() || room.len() > 256 {
            return Err(Refusal::RoomName);
        }
        if serde_json::from_str::<serde::de::IgnoredAny>(&payload).is_err() {
            return Err(Refusal::NotJson("broadcast payload"));
        }
        check_json_shape(payload.as_bytes()).map_err(|e| Refusal::Shape(e.message))?;
        let (id, _) = self.derive_id(&cause, Effect::Broadcast)?;
        let event = match payload_type(&payload) {
            Some(event) => event,
            None => self.causes.get(&cause).map(|c| c.event_type.clone()).unwrap_or_default(),
        };
        self.broadcasts.push(Broadcast { id, room, payload, event });
        Ok(())
    }

    pub(super) fn publish(
        &mut self,
        caps: &Capabilities,
        cause: String,
        event_type: String,
        data: String,
    ) -> Result<(), Refusal> {
        caps.need_publish(&event_type)?;
        check_event_type(&event_type).map_err(|e| Refusal::EventType(e.to_string()))?;
        // What every reader must be able to parse back, as producers' events must.
        check_json_shape(data.as_bytes()).map_err(|e| Refusal::Shape(e.message))?;
        let data = serde_json::from_str::<serde_json::Value>(&data).map_err(|_| Refusal::NotJson("publish data"))?;
        let (event_id, timestamp) = self.derive_id(&cause, Effect::Publish)?;
        let mut metadata = serde_json::Map::new();
        metadata.insert("causationId".into(), cause.into());
        metadata.insert("plugin".into(), self.plugin.to_string().into());
        let envelope = Envelope {
            event_id,
            event_type,
            timestamp,
            source: format!("plugin:{}", self.plugin),
            user_id: None,
            metadata,
            data,
            extra: serde_json::Map::new(),
        };
        let route = self.routing.route(&envelope.event_type);
        let (topic, key) = (route.topic().to_owned(), route.key_of(&envelope));
        self.publishes.push(AppendItem { topic, key, envelope });
        Ok(())
    }

    /// The id of the next publish or broadcast caused by event `cause`, derived from the
    /// plugin, the cause and how many of that kind it already made (stable whatever the
    /// batch boundaries); and the cause's timestamp.
    fn derive_id(&mut self, cause: &str, effect: Effect) -> Result<(uuid::Uuid, String), Refusal> {
        let plugin = self.plugin.clone();
        let Some(counts) = self.cause(cause) else {
            return Err(Refusal::UnknownCause(cause.to_owned()));
        };
        let (name, count) = match effect {
            Effect::Publish => (format!("owlery/{plugin}/{cause}/{}", counts.published), &mut counts.published),
            Effect::Broadcast => {
                (format!("owlery/{plugin}/{cause}/broadcast/{}", counts.broadcast), &mut counts.broadcast)
            }
            Effect::Http => (format!("owlery/{plugin}/{cause}/http/{}", counts.http), &mut counts.http),
        };
        *count += 1;
        let timestamp = counts.timestamp.clone();
        Ok((self.key.id(&name), timestamp))
    }

    /// What was published and broadcast so far for the event `id` of the current batch.
    fn cause(&mut self, id: &str) -> Option<&mut Cause> {
        if self.causes.is_empty() {
            self.causes = self
                .batch
                .iter()
                .map(|e| {
                    let cause = Cause {
                        timestamp: e.timestamp.clone(),
                        event_type: e.event_type.clone(),
                        published: 0,
                        broadcast: 0,
                        http: 0,
                    };
                    (e.event_id.clone(), cause)
                })
                .collect();
        }
        self.causes.get_mut(id)
    }
}

/// A JSON object payload's own `eventType` (a string, dotted like an event type), if it says.
fn payload_type(payload: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(borrow, rename = "eventType")]
        event_type: Option<std::borrow::Cow<'a, str>>,
    }
    if !payload.trim_start().starts_with('{') {
        return None;
    }
    let typed: Typed<'_> = serde_json::from_str(payload).ok()?;
    typed.event_type.filter(|t| check_event_type(t).is_ok()).map(std::borrow::Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Emitter, GuestEnvelope, Refusal};
    use crate::keys::HostKey;
    use crate::runtime::capabilities::Capabilities;

    fn event(id: &str) -> GuestEnvelope {
        GuestEnvelope {
            event_id: id.into(),
            event_type: "order.placed".into(),
            timestamp: "2024-01-01T00:00:00Z".into(),
            source: "test".into(),
            user_id: None,
            metadata: "{}".into(),
            data: "null".into(),
            topic: "orders".into(),
            partition: 0,
            offset: 0,
        }
    }

    fn broadcast_ids(batch: &[&str], causes: &[&str]) -> Vec<uuid::Uuid> {
        let caps = Capabilities { broadcast: true, ..Capabilities::default() };
        let mut emitter = Emitter::new("p".into(), Arc::default(), HostKey::from_secret(b"test"));
        emitter.begin(batch.iter().map(|id| event(id)).collect());
        for cause in causes {
            emitter.broadcast(&caps, cause.to_string(), "all".into(), "{}".into()).unwrap();
        }
        emitter.finish().broadcasts.into_iter().map(|b| b.id).collect()
    }

    #[test]
    fn a_broadcast_is_of_its_payloads_type_else_of_its_causes() {
        let caps = Capabilities { broadcast: true, ..Capabilities::default() };
        let mut emitter = Emitter::new("p".into(), Arc::default(), HostKey::from_secret(b"test"));
        emitter.begin(Arc::new([event("e1")]));
        for payload in [
            r#"{"eventType":"alert.raised","n":1}"#,
            r#"{"incident":{"eventType":"x.y"}}"#,
            "[1]",
            r#"{"eventType":"no dots"}"#,
        ] {
            emitter.broadcast(&caps, "e1".into(), "all".into(), payload.into()).unwrap();
        }
        let types: Vec<String> = emitter.finish().broadcasts.into_iter().map(|b| b.event).collect();
        assert_eq!(types, ["alert.raised", "order.placed", "order.placed", "order.placed"]);
    }

    #[test]
    fn broadcast_ids_depend_on_the_cause_not_on_the_batch() {
        let alone = broadcast_ids(&["e2"], &["e2", "e2"]);
        let batched = broadcast_ids(&["e1", "e2"], &["e1", "e2", "e2"]);
        assert_eq!(batched[1..], alone[..]);
        assert_ne!(alone[0], alone[1], "a second broadcast for one cause gets its own id");
    }

    #[test]
    fn plugin_output_nested_past_the_ingress_limit_is_refused() {
        let mut emitter = Emitter::new("p".into(), Arc::default(), HostKey::from_secret(b"test"));
        emitter.begin(Arc::new([event("e1")]));
        let caps =
            Capabilities { broadcast: true, publish: vec![crate::envelope::Pattern::new("*")], ..Default::default() };
        let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        let refused = emitter.publish(&caps, "e1".into(), "a.b".into(), deep.clone());
        assert!(matches!(refused, Err(Refusal::Shape(_))), "{refused:?}");
        let refused = emitter.broadcast(&caps, "e1".into(), "all".into(), deep);
        assert!(matches!(refused, Err(Refusal::Shape(_))), "{refused:?}");
    }

    #[test]
    fn http_requests_are_checked_and_their_ids_are_their_causes() {
        let request = |url: &str| crate::runtime::bindings::host::HttpRequest {
            method: "post".into(),
            url: url.into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: b"{}".to_vec(),
        };
        let caps = Capabilities {
            http: vec![crate::delivery::allow::UrlPattern::parse("http://127.0.0.1:9000/*").unwrap()],
            ..Capabilities::default()
        };
        let ids = |batch: &[&str]| {
            let mut emitter = Emitter::new("p".into(), Arc::default(), HostKey::from_secret(b"test"));
            emitter.begin(batch.iter().map(|id| event(id)).collect());
            for _ in 0..2 {
                emitter.send_http(&caps, "e2".into(), request("http://127.0.0.1:9000/a")).unwrap();
            }
            let refused = emitter.send_http(&caps, "e2".into(), request("http://127.0.0.1:9001/a"));
            assert!(matches!(&refused, Err(Refusal::Http(m)) if m.contains("does not allow")), "{:?}", refused.err());
            let refused = emitter.send_http(&Capabilities::default(), "e2".into(), request("http://127.0.0.1:9000/a"));
            assert!(matches!(&refused, Err(Refusal::Http(m)) if m.contains("no `http` capability")));
            let mut big = request("http://127.0.0.1:9000/a");
            big.body = vec![b'x'; crate::delivery::MAX_BODY + 1];
            let refused = emitter.send_http(&caps, "e2".into(), big);
            assert!(matches!(&refused, Err(Refusal::Http(m)) if m.contains("more than")), "{:?}", refused.err());
            let emitted = emitter.finish().requests;
            assert!(emitted.iter().all(|r| r.method == "POST"), "the method in capitals");
            emitted.into_iter().map(|r| r.id).collect::<Vec<_>>()
        };
        let alone = ids(&["e2"]);
        assert_eq!(alone, ids(&["e1", "e2"]), "the same requests whatever the batch");
        assert_ne!(alone[0], alone[1]);
        assert_ne!(alone[0], broadcast_ids(&["e2"], &["e2"])[0], "not a broadcast's id");
    }

    #[test]
    fn a_cause_outside_the_batch_or_the_manifest_is_refused() {
        let mut emitter = Emitter::new("p".into(), Arc::default(), HostKey::from_secret(b"test"));
        emitter.begin(Arc::new([event("e1")]));
        let no_caps = Capabilities::default();
        let refused = emitter.broadcast(&no_caps, "e1".into(), "all".into(), "{}".into());
        assert!(matches!(refused, Err(Refusal::NoBroadcast)));
        let caps = Capabilities { broadcast: true, ..Capabilities::default() };
        let refused = emitter.broadcast(&caps, "e9".into(), "all".into(), "{}".into());
        assert!(matches!(refused, Err(Refusal::UnknownCause(_))));
    }
}
