//! The plugin manifest: `NAME.toml` beside `NAME.wasm`, written by the operator.
//! It says what the plugin reads, what it may do and its limits; a plugin can never grant
//! itself a capability.

use serde::Deserialize;

use crate::envelope::Pattern;
use crate::runtime::Capabilities;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub subscribe: Subscribe,
    #[serde(default)]
    pub capabilities: ManifestCapabilities,
    #[serde(default)]
    pub limits: Limits,
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
}

fn yes() -> bool {
    true
}

impl Default for ManifestCapabilities {
    /// Without a `[capabilities]` table a plugin may keep state, nothing else.
    fn default() -> Self {
        ManifestCapabilities { broadcast: false, publish: Vec::new(), state: true }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub memory_mb: u64,
    pub batch_timeout_ms: u64,
    pub max_batch: usize,
    /// Attempts at a failing batch before its events are tried one by one.
    pub retries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { memory_mb: 64, batch_timeout_ms: 1_000, max_batch: 256, retries: 2 }
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
        manifest.validate()?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        let l = &self.limits;
        if !(1..=4096).contains(&l.memory_mb) {
            return Err(ManifestError::Invalid("limits.memory_mb must be 1 to 4096".into()));
        }
        if !(1..=600_000).contains(&l.batch_timeout_ms) {
            return Err(ManifestError::Invalid("limits.batch_timeout_ms must be 1 to 600000".into()));
        }
        if !(1..=65_536).contains(&l.max_batch) {
            return Err(ManifestError::Invalid("limits.max_batch must be 1 to 65536".into()));
        }
        if l.retries > 10 {
            return Err(ManifestError::Invalid("limits.retries must be at most 10".into()));
        }
        if !self.config.is_table() {
            return Err(ManifestError::Invalid("config must be a table".into()));
        }
        for topic in &self.subscribe.topics {
            crate::envelope::check_topic(topic)
                .map_err(|e| ManifestError::Invalid(format!("subscribe.topics: {e}")))?;
        }
        Ok(())
    }

    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            broadcast: self.capabilities.broadcast,
            publish: self.capabilities.publish.iter().map(Pattern::new).collect(),
            state: self.capabilities.state,
            memory_bytes: (self.limits.memory_mb as usize) << 20,
        }
    }

    pub fn event_patterns(&self) -> Vec<Pattern> {
        self.subscribe.event_types.iter().map(Pattern::new).collect()
    }

    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).expect("TOML values serialise to JSON")
    }
}

impl Default for Manifest {
    /// A `.wasm` without a manifest: reads every topic, may keep state, nothing else.
    fn default() -> Self {
        Manifest {
            subscribe: Subscribe::default(),
            capabilities: ManifestCapabilities::default(),
            limits: Limits::default(),
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
    fn refuses_unknown_keys_and_bad_limits() {
        assert!(Manifest::parse("[capabilities]\nroot = true").is_err());
        assert!(Manifest::parse("[limits]\nmemory_mb = 0\nbatch_timeout_ms = 1\nmax_batch = 1\nretries = 0").is_err());
    }
}
