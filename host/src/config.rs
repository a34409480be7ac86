//! Configuration: one serde `Config` whose defaults serve 127.0.0.1:8080 on the embedded log
//! with plugins from `plugins/` and data in `data/`. `owlery.toml` is layered over the
//! defaults, and the command line (flags and their `OWLERY_*`/`IGGY_*` environment
//! variables, see `cli`) is one overlay over that, in the same shape as the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::AuthConfig;
use crate::log::iggy::IggySettings;
use crate::presence::PresenceConfig;
use crate::routing::{RoutingConfig, RoutingError};

/// Which log the host reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogBackend {
    /// Durable on local disk; no server needed.
    Embedded,
    /// An Apache Iggy server over TCP.
    Iggy,
}

/// Everything `owlery serve` can be told; every key of `owlery.toml` is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub auth: AuthConfig,
    pub log: LogBackend,
    pub iggy: IggyConfig,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub plugins_dir: PathBuf,
    /// Partitions of each topic the embedded log creates.
    pub partitions: u32,
    /// Fan-out records kept for resuming clients.
    pub fanout_retention: u64,
    /// Nor any older than this many seconds (0: no age limit).
    pub fanout_max_age_secs: u64,
    /// Frames queued for one WebSocket client; one that falls this far behind is
    /// disconnected (and told to resume from its last offset).
    pub client_queue: usize,
    /// ... or this many bytes of frames (`/ws`).
    pub client_queue_bytes: usize,
    /// Kernel send buffer of each connection, in bytes (0: the system's default). Smaller
    /// means a client that stops reading is noticed sooner.
    pub socket_send_buffer: usize,
    /// Largest `.wasm` upload, in MiB (413 beyond it).
    pub max_upload_mb: usize,
    /// How long compiling one plugin may take.
    pub compile_timeout_ms: u64,
    /// Topics producers may name with `?topic=` besides the routing table's.
    pub extra_topics: Vec<String>,
    /// Largest message a WebSocket or Socket.IO client may send, in bytes.
    pub ws_max_message_bytes: usize,
    /// Rooms one client may be in.
    pub max_rooms_per_client: usize,
    /// WebSocket and Socket.IO clients connected at once; more get 503 (or are disconnected).
    pub max_clients: usize,
    /// The secret hosts sharing a log key output ids and sign fan-out records with (at least
    /// 32 bytes; see `keys` for what is used without it).
    pub cluster_secret: Option<String>,
    /// Event types to topics and partition keys (see `routing`).
    pub routing: RoutingConfig,
    /// Presence events the host publishes for fan-out clients (see `presence`).
    pub presence: PresenceConfig,
    /// `/ready` answers 503 while more accepted events than this wait in the Iggy spool.
    pub ready_max_spool_depth: u64,
    /// Plugins' HTTP requests in flight at once to one scheme://host:port.
    pub http_per_destination: usize,
    /// `text` (for people) or `json` (one object per line, for machines); `OWLERY_LOG_FORMAT`.
    pub log_format: LogFormat,
}

/// How the host writes its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            auth: AuthConfig::default(),
            log: LogBackend::Embedded,
            iggy: IggyConfig::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("data"),
            plugins_dir: PathBuf::from("plugins"),
            partitions: 4,
            fanout_retention: 100_000,
            fanout_max_age_secs: 86_400,
            client_queue: 1024,
            client_queue_bytes: 8 << 20,
            socket_send_buffer: 0,
            max_upload_mb: 64,
            compile_timeout_ms: 60_000,
            extra_topics: Vec::new(),
            ws_max_message_bytes: 64 << 10,
            max_rooms_per_client: 100,
            max_clients: 10_000,
            cluster_secret: None,
            routing: RoutingConfig::default(),
            presence: PresenceConfig::default(),
            ready_max_spool_depth: 100_000,
            http_per_destination: 4,
            log_format: LogFormat::Text,
        }
    }
}

/// The `[iggy]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IggyConfig {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    /// The stream holding Owlery's topics.
    pub stream: String,
    /// Partitions of each topic Owlery creates.
    pub partitions: u32,
    /// Recent `eventId`s remembered for deduplicating publishes.
    pub dedup_window: u64,
}

impl Default for IggyConfig {
    fn default() -> Self {
        let settings = IggySettings::default();
        let (host, port) = settings.address.rsplit_once(':').expect("the default address is host:port");
        IggyConfig {
            host: host.to_owned(),
            port: port.parse().expect("the default port is a number"),
            username: settings.username,
            password: settings.password,
            stream: settings.stream,
            partitions: settings.partitions,
            dedup_window: settings.dedup_window,
        }
    }
}

impl IggyConfig {
    /// `host:port` of the server's TCP transport.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// What the Iggy backend is opened with.
    pub fn settings(&self) -> IggySettings {
        IggySettings {
            address: self.address(),
            username: self.username.clone(),
            password: self.password.clone(),
            stream: self.stream.clone(),
            partitions: self.partitions,
            // The shared fan-out log keeps one order: one partition.
            // So do plugins' HTTP requests (one partition is one poll for the claim).
            single_partition_topics: vec![crate::topics::FANOUT.to_owned(), crate::topics::HTTP.to_owned()],
            dedup_window: self.dedup_window,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("the command line: {0}")]
    Flags(#[from] toml::ser::Error),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Routing(#[from] RoutingError),
}

impl Config {
    /// The defaults, then the file at `path` (a missing file is an empty one unless
    /// `required`), then `overlay` (the command line, as a table shaped like the file).
    pub fn load(path: &Path, required: bool, overlay: toml::Table) -> Result<Config, ConfigError> {
        let mut table = match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => toml::Table::new(),
            Err(source) => return Err(ConfigError::Read { path: path.to_owned(), source }),
        };
        merge(&mut table, overlay);
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        config.validate()?;
        Ok(config)
    }

    /// What each fan-out client may take.
    pub fn client_limits(&self) -> crate::fanout::ClientLimits {
        crate::fanout::ClientLimits {
            queue: self.client_queue,
            queue_bytes: self.client_queue_bytes,
            max_message: self.ws_max_message_bytes,
            max_rooms: self.max_rooms_per_client,
            max_clients: self.max_clients,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if !(1..=1024).contains(&self.partitions) {
            return invalid("partitions must be 1 to 1024".into());
        }
        if !(1..=1024).contains(&self.iggy.partitions) {
            return invalid("iggy.partitions must be 1 to 1024".into());
        }
        if let Err(e) = crate::envelope::check_topic(&self.iggy.stream) {
            return invalid(format!("iggy.stream: {e}"));
        }
        if !(1..=1_000_000).contains(&self.client_queue) {
            return invalid("client_queue must be 1 to 1000000".into());
        }
        if !(4096..=1 << 30).contains(&self.client_queue_bytes) {
            return invalid("client_queue_bytes must be 4096 to 1073741824".into());
        }
        if !(1..=1024).contains(&self.max_upload_mb) {
            return invalid("max_upload_mb must be 1 to 1024".into());
        }
        if self.ws_max_message_bytes < 1024 || self.max_rooms_per_client == 0 || self.max_clients == 0 {
            return invalid(
                "ws_max_message_bytes must be at least 1024; max_rooms_per_client and max_clients at least 1".into(),
            );
        }
        if self.compile_timeout_ms == 0 {
            return invalid("compile_timeout_ms must be at least 1".into());
        }
        for topic in &self.extra_topics {
            if let Err(e) = crate::envelope::check_topic(topic) {
                return invalid(format!("extra_topics: {e}"));
            }
            if crate::topics::is_internal(topic) {
                return invalid(format!("extra_topics: {topic:?} is one of Owlery's own topics"));
            }
        }
        crate::routing::Routing::from_config(&self.routing)?;
        if self.fanout_retention == 0 {
            return invalid("fanout_retention must be at least 1".into());
        }
        if !(1..=256).contains(&self.http_per_destination) {
            return invalid("http_per_destination must be 1 to 256".into());
        }
        if !self.listen.ip().is_loopback() && !self.auth.enabled {
            return invalid(format!(
                "refusing to listen on {} without authentication: turn on [auth] in owlery.toml \
                 (tokens or a JWT secret), or listen on a loopback address (127.0.0.1 or ::1)",
                self.listen
            ));
        }
        if self.cluster_secret.as_ref().is_some_and(|s| s.len() < crate::keys::MIN_SECRET_BYTES) {
            return invalid(format!(
                "cluster_secret must be at least {} bytes (for example: openssl rand -hex 32)",
                crate::keys::MIN_SECRET_BYTES
            ));
        }
        if self.auth.jwt_secret.as_ref().is_some_and(|s| s.len() < crate::keys::MIN_SECRET_BYTES) {
            return invalid(format!(
                "[auth] jwt_secret must be at least {} bytes (for example: openssl rand -hex 32)",
                crate::keys::MIN_SECRET_BYTES
            ));
        }
        if self.auth.enabled && self.log == LogBackend::Iggy && self.cluster_secret.is_none() {
            return invalid(
                "on Iggy with [auth] on, set cluster_secret (32 bytes or more, the same on every host): \
                 without it output ids and fan-out signatures are keyed from the Iggy credentials"
                    .into(),
            );
        }
        if self.auth.enabled && self.auth.tokens.is_empty() && self.auth.jwt_secret.is_none() {
            return invalid("[auth] is enabled but has no tokens and no jwt_secret".into());
        }
        Ok(())
    }
}

/// `over`'s keys replace `base`'s; tables are merged key by key.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(value)) => merge(inner, value),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlay_wins_over_the_file_and_the_file_over_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owlery.toml");
        std::fs::write(&path, "partitions = 3\nclient_queue = 7\n[iggy]\nhost = \"iggy.local\"\nport = 9000\n")
            .unwrap();
        let overlay: toml::Table = toml::from_str("partitions = 5\n[iggy]\nport = 9100\n").unwrap();
        let config = Config::load(&path, true, overlay).unwrap();
        assert_eq!(config.partitions, 5);
        assert_eq!(config.client_queue, 7);
        assert_eq!(config.iggy.address(), "iggy.local:9100");
        assert_eq!(config.fanout_retention, Config::default().fanout_retention);
    }

    #[test]
    fn unknown_keys_and_missing_required_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owlery.toml");
        assert!(matches!(Config::load(&path, true, toml::Table::new()), Err(ConfigError::Read { .. })));
        assert!(Config::load(&path, false, toml::Table::new()).is_ok());
        std::fs::write(&path, "partitons = 3\n").unwrap();
        let error = Config::load(&path, true, toml::Table::new()).unwrap_err().to_string();
        assert!(error.contains("partitons"), "{error}");
    }
}
