//! Configuration: `owlery.toml`, overridden by `OWLERY_*` environment variables, overridden
//! by command-line flags. No configuration at all serves 127.0.0.1:8080 on the embedded
//! log with plugins from `plugins/` and data in `data/`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::log::iggy::IggySettings;

/// Which log the host reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogBackend {
    /// Durable on local disk; no server needed.
    Embedded,
    /// An Apache Iggy server over TCP.
    Iggy,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub auth: crate::auth::AuthConfig,
    pub log: LogBackend,
    pub iggy: IggySettings,
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
    /// Kernel send buffer of each connection, in bytes (0: the system's default). Smaller
    /// means a client that stops reading is noticed sooner.
    pub socket_send_buffer: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            auth: crate::auth::AuthConfig::default(),
            log: LogBackend::Embedded,
            iggy: IggySettings::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("data"),
            plugins_dir: PathBuf::from("plugins"),
            partitions: 4,
            fanout_retention: 100_000,
            fanout_max_age_secs: 86_400,
            client_queue: 1024,
            socket_send_buffer: 0,
        }
    }
}

/// The keys `owlery.toml` may hold (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub auth: Option<crate::auth::AuthConfig>,
    pub log: Option<LogBackend>,
    pub iggy: Option<IggyFile>,
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub plugins_dir: Option<PathBuf>,
    pub partitions: Option<u32>,
    pub fanout_retention: Option<u64>,
    pub fanout_max_age_secs: Option<u64>,
    pub client_queue: Option<usize>,
    pub socket_send_buffer: Option<usize>,
}

/// The `[iggy]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IggyFile {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub stream: Option<String>,
    pub partitions: Option<u32>,
    pub dedup_window: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl ConfigFile {
    /// Read `path`; a missing file is an empty configuration only when `required` is false.
    pub fn load(path: &Path, required: bool) -> Result<ConfigFile, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                toml::from_str(&text).map_err(|e| ConfigError::File { path: path.to_owned(), message: e.to_string() })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(ConfigFile::default()),
            Err(e) => Err(ConfigError::File { path: path.to_owned(), message: e.to_string() }),
        }
    }
}

impl Config {
    /// Layer the file over the defaults; flags and environment (already merged by the CLI)
    /// are layered over that by the caller.
    pub fn from_file(file: ConfigFile) -> Config {
        let d = Config::default();
        let i = file.iggy.unwrap_or_default();
        let (default_host, default_port) = d.iggy.address.rsplit_once(':').expect("host:port");
        let iggy = IggySettings {
            address: format!(
                "{}:{}",
                i.host.as_deref().unwrap_or(default_host),
                i.port.map_or_else(|| default_port.to_owned(), |p| p.to_string())
            ),
            username: i.username.unwrap_or(d.iggy.username),
            password: i.password.unwrap_or(d.iggy.password),
            stream: i.stream.unwrap_or(d.iggy.stream),
            partitions: i.partitions.unwrap_or(d.iggy.partitions),
            single_partition_topics: d.iggy.single_partition_topics,
            dedup_window: i.dedup_window.unwrap_or(d.iggy.dedup_window),
        };
        Config {
            auth: file.auth.unwrap_or(d.auth),
            log: file.log.unwrap_or(d.log),
            iggy,
            listen: file.listen.unwrap_or(d.listen),
            data_dir: file.data_dir.unwrap_or(d.data_dir),
            plugins_dir: file.plugins_dir.unwrap_or(d.plugins_dir),
            partitions: file.partitions.unwrap_or(d.partitions),
            fanout_retention: file.fanout_retention.unwrap_or(d.fanout_retention),
            fanout_max_age_secs: file.fanout_max_age_secs.unwrap_or(d.fanout_max_age_secs),
            client_queue: file.client_queue.unwrap_or(d.client_queue),
            socket_send_buffer: file.socket_send_buffer.unwrap_or(d.socket_send_buffer),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1024).contains(&self.partitions) {
            return Err(ConfigError::Invalid("partitions must be 1 to 1024".into()));
        }
        if !(1..=1024).contains(&self.iggy.partitions) {
            return Err(ConfigError::Invalid("iggy.partitions must be 1 to 1024".into()));
        }
        crate::envelope::check_topic(&self.iggy.stream)
            .map_err(|e| ConfigError::Invalid(format!("iggy.stream: {e}")))?;
        if !(1..=1_000_000).contains(&self.client_queue) {
            return Err(ConfigError::Invalid("client_queue must be 1 to 1000000".into()));
        }
        if self.fanout_retention == 0 {
            return Err(ConfigError::Invalid("fanout_retention must be at least 1".into()));
        }
        if !self.listen.ip().is_loopback() && !self.auth.enabled {
            return Err(ConfigError::Invalid(format!(
                "refusing to listen on {} without authentication: turn on [auth] in owlery.toml \
                 (tokens or a JWT secret), or listen on a loopback address (127.0.0.1 or ::1)",
                self.listen
            )));
        }
        if self.auth.enabled && self.auth.tokens.is_empty() && self.auth.jwt_secret.is_none() {
            return Err(ConfigError::Invalid("[auth] is enabled but has no tokens and no jwt_secret".into()));
        }
        Ok(())
    }
}
