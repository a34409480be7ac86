//! The plugin manifest: `NAME.toml` beside `NAME.wasm`, written by the operator.
//! It says what the plugin reads, what it may do and its limits; a plugin can never grant
//! itself a capability.

use serde::Deserialize;

use crate::delivery::allow::UrlPattern;
use crate::envelope::Pattern;
use crate::runtime::{CallLimits, Capabilities};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub subscribe: Subscribe,
    #[serde(default)]
    pub capabilities: ManifestCapabilities,
    #[serde(default)]
    pub limits: Limits,
    /// How `send-http` requests are delivered.
    #[serde(default)]
    pub delivery: crate::delivery::Policy,
    /// Free-form table handed to the plugin's `init` as JSON.
    #[serde(default = "empty_table")]
    pub config: toml::Value,
}

fn empty_table() -> toml::Value {
    toml::Value::Table(Default::default())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    /// Topics read; empty means every topic except the host's own (dead letters).
    #[serde(default)]
    pub topics: Vec<String>,
    /// Event-type patterns delivered (`incident.*`, `*`); others are skipped.
    #[serde(default = "everything")]
    pub event_types: Vec<String>,
    #[serde(default)]
    pub start: Start,
}

fn everything() -> Vec<String> {
    vec!["*".to_owned()]
}

impl Default for Subscribe {
    fn default() -> Self {
        Subscribe { topics: Vec::new(), event_types: everything(), start: Start::Earliest }
    }
}

/// Where a plugin without stored offsets starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    #[default]
    Earliest,
    Latest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestCapabilities {
    #[serde(default)]
    pub broadcast: bool,
    /// Event-type patterns the plugin may publish.
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default = "yes")]
    pub state: bool,
    /// URL patterns HTTP requests may go to (see `delivery::allow`).
    #[serde(default)]
    pub http: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Default for ManifestCapabilities {
    /// Without a `[capabilities]` table a plugin may keep state, nothing else.
    fn default() -> Self {
        ManifestCapabilities { broadcast: false, publish: Vec::new(), state: true, http: Vec::new() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Linear memory, all the plugin's memories together.
    pub memory_mb: u64,
    /// Deadline of one `init` or `handle` call, whatever the plugin does in it.
    pub batch_timeout_ms: u64,
    pub max_batch: usize,
    /// Attempts at a failing batch before its events are tried one by one.
    pub retries: u32,
    /// Deadline of one `query` call.
    pub query_timeout_ms: u64,
    /// Queries waiting for the plugin; more are answered 503.
    pub max_queued_queries: usize,
    /// State writes, broadcasts and publishes one call may buffer, together.
    pub output_bytes_per_batch: usize,
    pub max_state_value_bytes: usize,
    pub max_state_key_bytes: usize,
    /// Log lines and stdout/stderr one call may write; the excess is dropped and counted.
    pub log_bytes_per_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let call = CallLimits::default();
        Limits {
            memory_mb: (call.memory >> 20) as u64,
            batch_timeout_ms: 1_000,
            max_batch: 256,
            retries: 2,
            query_timeout_ms: 1_000,
            max_queued_queries: 8,
            output_bytes_per_batch: call.output,
            max_state_value_bytes: call.state_value,
            max_state_key_bytes: call.state_key,
            log_bytes_per_batch: call.log,
        }
    }
}

impl Limits {
    pub fn call_limits(&self) -> CallLimits {
        CallLimits {
            memory: (self.memory_mb as usize) << 20,
            output: self.output_bytes_per_batch,
            state_value: self.max_state_value_bytes,
            state_key: self.max_state_key_bytes,
            log: self.log_bytes_per_batch,
        }
    }

    /// Each limit's allowed range: `(key, value, low, high)`.
    fn ranges(&self) -> [(&'static str, u64, u64, u64); 10] {
        [
            ("memory_mb", self.memory_mb, 1, 4096),
            ("batch_timeout_ms", self.batch_timeout_ms, 1, 600_000),
            ("max_batch", self.max_batch as u64, 1, 65_536),
            ("retries", u64::from(self.retries), 0, 10),
            ("query_timeout_ms", self.query_timeout_ms, 1, 600_000),
            ("max_queued_queries", self.max_queued_queries as u64, 1, 1024),
            ("output_bytes_per_batch", self.output_bytes_per_batch as u64, 1, 1 << 30),
            ("max_state_value_bytes", self.max_state_value_bytes as u64, 1, 64 << 20),
            ("max_state_key_bytes", self.max_state_key_bytes as u64, 1, 64 << 10),
            ("log_bytes_per_batch", self.log_bytes_per_batch as u64, 0, 64 << 20),
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    #[error("{0}")]
    Invalid(String),
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = toml::from_str(text)?;
        check_delivery_keys(text)?;
        manifest.validate()?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        for (key, value, low, high) in self.limits.ranges() {
            if !(low..=high).contains(&value) {
                return Err(ManifestError::Invalid(format!("limits.{key} must be {low} to {high}")));
            }
        }
        for (key, value, low, high) in self.delivery.ranges() {
            if !(low..=high).contains(&value) {
                return Err(ManifestError::Invalid(format!("delivery.{key} must be {low} to {high}")));
            }
        }
        for pattern in &self.capabilities.http {
            UrlPattern::parse(pattern).map_err(|e| ManifestError::Invalid(format!("capabilities.http: {e}")))?;
        }
        if !self.config.is_table() {
            return Err(ManifestError::Invalid("config must be a table".into()));
        }
        for topic in &self.subscribe.topics {
            crate::envelope::check_topic(topic)
                .map_err(|e| ManifestError::Invalid(format!("subscribe.topics: {e}")))?;
            if crate::topics::is_host_only(topic) {
                return Err(ManifestError::Invalid(format!(
                    "subscribe.topics: {topic:?} is the host's own; no plugin may read it"
                )));
            }
        }
        Ok(())
    }

    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            broadcast: self.capabilities.broadcast,
            publish: self.capabilities.publish.iter().map(Pattern::new).collect(),
            state: self.capabilities.state,
            // Checked by `validate`.
            http: self.capabilities.http.iter().filter_map(|p| UrlPattern::parse(p).ok()).collect(),
            delivery: self.delivery,
            limits: self.limits.call_limits(),
        }
    }

    pub fn event_patterns(&self) -> Vec<Pattern> {
        self.subscribe.event_types.iter().map(Pattern::new).collect()
    }

    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).expect("TOML values serialise to JSON")
    }
}

/// Unknown `[delivery]` keys are refused here rather than by `Policy`'s own serde: the same
/// type travels in every request record, where a newer host's extra field must not make an
/// older host skip the record.
fn check_delivery_keys(text: &str) -> Result<(), ManifestError> {
    let table: toml::Table = toml::from_str(text)?;
    let Some(delivery) = table.get("delivery").and_then(|d| d.as_table()) else { return Ok(()) };
    let known = crate::delivery::Policy::default().ranges().map(|(key, ..)| key);
    match delivery.keys().find(|key| !known.contains(&key.as_str())) {
        Some(key) => {
            Err(ManifestError::Invalid(format!("unknown key delivery.{key}; expected one of {}", known.join(", "))))
        }
        None => Ok(()),
    }
}

impl Default for Manifest {
    /// A `.wasm` without a manifest: reads every topic, may keep state, nothing else.
    fn default() -> Self {
        Manifest {
            subscribe: Subscribe::default(),
            capabilities: ManifestCapabilities::default(),
            limits: Limits::default(),
            delivery: crate::delivery::Policy::default(),
            config: empty_table(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_manifest() {
        let m = Manifest::parse(
            r#"
            [subscribe]
            topics = ["incident-events"]
            event_types = ["incident.*"]
            [capabilities]
            broadcast = true
            publish = ["alert.raised"]
            [limits]
            memory_mb = 16
            batch_timeout_ms = 100
            max_batch = 10
            retries = 1
            [config]
            severities = ["CRITICAL"]
            "#,
        )
        .unwrap();
        assert!(m.capabilities().broadcast);
        assert!(m.capabilities().publish[0].matches("alert.raised"));
        assert_eq!(m.config_json(), r#"{"severities":["CRITICAL"]}"#);
    }

    #[test]
    fn http_patterns_and_delivery_are_read_and_checked() {
        let m = Manifest::parse(
            "[capabilities]\nhttp = [\"https://hooks.example.com/*\"]\n[delivery]\nattempts = 3\nbackoff_ms = 10",
        )
        .unwrap();
        let caps = m.capabilities();
        assert_eq!(caps.http.len(), 1);
        assert_eq!((caps.delivery.attempts, caps.delivery.backoff_ms, caps.delivery.timeout_ms), (3, 10, 10_000));
        let error = Manifest::parse("[capabilities]\nhttp = [\"hooks.example.com\"]").unwrap_err().to_string();
        assert!(error.contains("capabilities.http"), "{error}");
        let error = Manifest::parse("[delivery]\nattempts = 0").unwrap_err().to_string();
        assert!(error.contains("delivery.attempts must be 1 to 100"), "{error}");
        let error = Manifest::parse("[delivery]\nretries = 1").unwrap_err().to_string();
        assert!(error.contains("unknown key delivery.retries"), "{error}");
    }

    #[test]
    fn no_plugin_may_subscribe_to_the_hosts_own_topics() {
        for topic in ["owlery-http", "owlery-fanout"] {
            let error = Manifest::parse(&format!("[subscribe]\ntopics = [\"{topic}\"]")).unwrap_err().to_string();
            assert!(error.contains("the host's own"), "{topic}: {error}");
        }
        assert!(Manifest::parse("[subscribe]\ntopics = [\"dead-letters\"]").is_ok(), "dead letters may be read");
    }

    #[test]
    fn refuses_unknown_keys_and_bad_limits() {
        assert!(Manifest::parse("[capabilities]\nroot = true").is_err());
        assert!(Manifest::parse("[limits]\nmemory_mb = 0\nbatch_timeout_ms = 1\nmax_batch = 1\nretries = 0").is_err());
    }
}
