//! The event envelope: its wire shape, its validation, and the routing of event types to topics.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// One event as producers send it and as the log stores it (JSON, camelCase keys).
/// Fields the host does not know are kept in `extra` and written back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub event_id: Uuid,
    pub event_type: String,
    pub timestamp: String,
    pub source: String,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    #[serde(default)]
    pub data: Value,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A stored envelope read for a plugin, borrowing from the stored bytes: `metadata` and
/// `data` stay the JSON text they were stored as, so nothing is parsed into values and
/// written back on the way into the plugin. Accepts what `Envelope::from_bytes` accepts.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredEnvelope<'a> {
    #[serde(borrow)]
    pub event_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub event_type: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub timestamp: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub source: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    pub user_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    pub metadata: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    pub data: Option<&'a serde_json::value::RawValue>,
}

impl<'a> StoredEnvelope<'a> {
    /// Parse stored bytes; the event id is checked to be a UUID and returned with it.
    pub fn parse(bytes: &'a [u8]) -> Result<(Uuid, StoredEnvelope<'a>), String> {
        let envelope: StoredEnvelope<'a> = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let id = Uuid::parse_str(&envelope.event_id).map_err(|e| format!("eventId: {e}"))?;
        if envelope.metadata.is_some_and(|m| !m.get().trim_start().starts_with('{')) {
            return Err("metadata: expected a JSON object".into());
        }
        Ok((id, envelope))
    }
}

/// Why an envelope was refused; `field` names the offending field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct EnvelopeError {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> EnvelopeError {
    EnvelopeError { field, message: message.into() }
}

/// The longest event type accepted; keeps topic routing and room names sane.
const MAX_EVENT_TYPE_LEN: usize = 128;

/// `incident.created`: dot-separated segments of letters, digits, `_` and `-`.
pub fn check_event_type(event_type: &str) -> Result<(), String> {
    if event_type.is_empty() {
        return Err("must not be empty".into());
    }
    if event_type.len() > MAX_EVENT_TYPE_LEN {
        return Err(format!("must be at most {MAX_EVENT_TYPE_LEN} characters"));
    }
    let segment_ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !event_type.split('.').all(segment_ok) || !event_type.contains('.') {
        return Err(format!(
            "{event_type:?} is not a dotted event type like \"incident.created\" (letters, digits, '_' and '-' between dots)"
        ));
    }
    Ok(())
}

impl Envelope {
    /// Validate one JSON value from a producer and fill in what the host assigns
    /// (`eventId`, `timestamp`, `source`). Every error names the field.
    pub fn from_producer(value: Value) -> Result<Envelope, EnvelopeError> {
        let Value::Object(mut object) = value else {
            return Err(invalid("(body)", "an event must be a JSON object"));
        };
        let event_type = match object.remove("eventType") {
            Some(Value::String(s)) => s,
            Some(other) => return Err(invalid("eventType", format!("must be a string, got {}", kind(&other)))),
            None => return Err(invalid("eventType", "is required")),
        };
        check_event_type(&event_type).map_err(|m| invalid("eventType", m))?;
        let event_id = match object.remove("eventId") {
            None | Some(Value::Null) => Uuid::new_v4(),
            Some(Value::String(s)) => {
                Uuid::parse_str(&s).map_err(|_| invalid("eventId", format!("{s:?} is not a UUID")))?
            }
            Some(other) => return Err(invalid("eventId", format!("must be a UUID string, got {}", kind(&other)))),
        };
        let timestamp = match object.remove("timestamp") {
            None | Some(Value::Null) => now_rfc3339(),
            Some(Value::String(s)) => {
                let parsed = chrono::DateTime::parse_from_rfc3339(&s)
                    .map_err(|e| invalid("timestamp", format!("{s:?} is not an RFC 3339 timestamp: {e}")))?;
                parsed.with_timezone(&chrono::Utc).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            }
            Some(other) => {
                return Err(invalid("timestamp", format!("must be an RFC 3339 string, got {}", kind(&other))));
            }
        };
        let source = match object.remove("source") {
            None | Some(Value::Null) => "api".to_owned(),
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(Value::String(_)) => return Err(invalid("source", "must not be empty")),
            Some(other) => return Err(invalid("source", format!("must be a string, got {}", kind(&other)))),
        };
        let user_id = match object.remove("userId") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(other) => return Err(invalid("userId", format!("must be a string, got {}", kind(&other)))),
        };
        let metadata = match object.remove("metadata") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m,
            Some(other) => return Err(invalid("metadata", format!("must be an object, got {}", kind(&other)))),
        };
        let data = object.remove("data").unwrap_or_else(|| Value::Object(Map::new()));
        Ok(Envelope { event_id, event_type, timestamp, source, user_id, metadata, data, extra: object })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serialises")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Envelope, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// How deeply a producer's JSON may nest (objects and arrays). Well below the parser's own
/// limit (128), so that whatever the host stores it can always read back and re-encode.
pub const MAX_JSON_DEPTH: usize = 64;

/// Check a request body before parsing it: nesting at most `MAX_JSON_DEPTH` deep, and every
/// integer within 64 bits (a bigger one would be rounded silently to a float). Only the
/// structure is looked at here; the parser reports everything else.
pub fn check_json_shape(bytes: &[u8]) -> Result<(), EnvelopeError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(invalid("(body)", format!("JSON nested deeper than {MAX_JSON_DEPTH} levels")));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let end = bytes[i..].iter().position(|b| !matches!(b, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'));
                let token = &bytes[i..end.map_or(bytes.len(), |n| i + n)];
                check_integer(token)?;
                i += token.len();
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// An integer literal (no fraction, no exponent) must fit `i64` or `u64`.
fn check_integer(token: &[u8]) -> Result<(), EnvelopeError> {
    if token.iter().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        return Ok(());
    }
    let text = std::str::from_utf8(token).unwrap_or("");
    if text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok() || text.is_empty() || text == "-" {
        return Ok(());
    }
    Err(invalid("(body)", format!("the integer {text} does not fit in 64 bits; send it as a string")))
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An event-type pattern: `incident.*` (prefix), `*` (anything), or an exact type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(pattern: impl Into<String>) -> Self {
        Pattern(pattern.into())
    }

    pub fn matches(&self, event_type: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => event_type.starts_with(prefix),
            None => self.0 == event_type,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An event-type pattern as config may give it: `*`, `prefix.*`, or an exact dotted type.
pub fn check_event_pattern(pattern: &str) -> Result<(), String> {
    match pattern.strip_suffix('*') {
        Some("") => Ok(()),
        Some(prefix) if prefix.ends_with('.') => check_event_type(&format!("{prefix}x")),
        Some(_) => Err(format!("{pattern:?}: a pattern is *, prefix.* or an event type")),
        None => check_event_type(pattern),
    }
}

/// Topic names: letters, digits, `-`, `_` and `.`, at most 255 characters.
pub fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > 255 {
        return Err("must be 1 to 255 characters".into());
    }
    if !topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(format!("{topic:?} may hold only letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_nested_too_deep_or_with_oversized_integers_are_refused() {
        let nested = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert!(check_json_shape(nested(MAX_JSON_DEPTH).as_bytes()).is_ok());
        let error = check_json_shape(nested(MAX_JSON_DEPTH + 1).as_bytes()).unwrap_err();
        assert!(error.to_string().contains("nested deeper than 64"), "{error}");
        // Brackets inside strings are text, not nesting.
        let text = format!(r#"{{"a": "{}\"["}}"#, "[".repeat(500));
        assert!(check_json_shape(text.as_bytes()).is_ok());
        for fits in ["-9223372036854775808", "18446744073709551615", "1.5e300", "123456789012345678901234.0"] {
            assert!(check_json_shape(format!(r#"{{"n": {fits}}}"#).as_bytes()).is_ok(), "{fits}");
        }
        for too_big in ["18446744073709551616", "-9223372036854775809", "123456789012345678901234"] {
            let error = check_json_shape(format!(r#"{{"n": [{too_big}]}}"#).as_bytes()).unwrap_err();
            assert!(error.to_string().contains("does not fit in 64 bits"), "{error}");
        }
    }
    use serde_json::json;

    #[test]
    fn a_stored_envelope_reads_as_it_was_written_and_refuses_what_from_bytes_refuses() {
        let envelope = Envelope::from_producer(json!({
            "eventType": "incident.created", "userId": "u\"1", "metadata": {"b": 1, "a": [2]},
            "data": {"id": 42, "text": "café \n"}, "extraField": true
        }))
        .unwrap();
        let bytes = envelope.to_bytes();
        let (id, stored) = StoredEnvelope::parse(&bytes).unwrap();
        assert_eq!(id, envelope.event_id);
        assert_eq!(stored.event_type, "incident.created");
        assert_eq!(stored.user_id.as_deref(), Some("u\"1"));
        let data: Value = serde_json::from_str(stored.data.unwrap().get()).unwrap();
        assert_eq!(data, envelope.data);
        let metadata: Value = serde_json::from_str(stored.metadata.unwrap().get()).unwrap();
        assert_eq!(metadata, Value::Object(envelope.metadata.clone()));

        let minimal =
            br#"{"eventId":"0c6e2b8e-33a1-4f3e-a9a8-2d9a0b1f2e3d","eventType":"t.x","timestamp":"t","source":"s"}"#;
        let (_, stored) = StoredEnvelope::parse(minimal).unwrap();
        assert!(stored.data.is_none() && stored.metadata.is_none() && stored.user_id.is_none());
        for bad in [
            &br#"{"eventId":"nope","eventType":"t.x","timestamp":"t","source":"s"}"#[..],
            br#"{"eventType":"t.x","timestamp":"t","source":"s"}"#,
            br#"{"eventId":"0c6e2b8e-33a1-4f3e-a9a8-2d9a0b1f2e3d","eventType":"t.x","timestamp":"t","source":"s","metadata":[1]}"#,
            b"not json",
        ] {
            assert!(StoredEnvelope::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
            assert!(Envelope::from_bytes(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn fills_in_what_the_host_assigns_and_keeps_unknown_fields() {
        let e = Envelope::from_producer(json!({"eventType": "incident.created", "data": {"id": 1}, "tenant": "x"}))
            .unwrap();
        assert_eq!(e.source, "api");
        assert_eq!(e.extra["tenant"], "x");
        let round: Value = serde_json::from_slice(&e.to_bytes()).unwrap();
        assert_eq!(round["tenant"], "x");
        assert_eq!(round["eventId"], e.event_id.to_string());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({}), "eventType"),
            (json!({"eventType": 5}), "eventType"),
            (json!({"eventType": "nodots"}), "eventType"),
            (json!({"eventType": "a.b", "eventId": "nope"}), "eventId"),
            (json!({"eventType": "a.b", "timestamp": "yesterday"}), "timestamp"),
            (json!({"eventType": "a.b", "metadata": []}), "metadata"),
            (json!({"eventType": "a.b", "userId": {}}), "userId"),
            (json!([1]), "(body)"),
        ];
        for (value, field) in cases {
            assert_eq!(Envelope::from_producer(value.clone()).unwrap_err().field, field, "{value}");
        }
    }
}
