//! The command line: `owlery serve`, and `owlery plugins ...` against a running host.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::config::{Config, ConfigError, LogBackend};

#[derive(Debug, Parser)]
#[command(name = "owlery", version, about = "Runs WebAssembly consumer plugins over an event log")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API and run the plugins of the plugins directory.
    Serve(ServeArgs),
    /// Manage the plugins of a running host.
    Plugins(PluginsArgs),
    /// Write a new plugin project, or test a plugin offline.
    #[command(subcommand)]
    Plugin(crate::kit::KitAction),
    /// Measure dispatch, publish, end-to-end, replay, hot swap, fan-out and footprint.
    #[cfg(feature = "bench")]
    Bench(crate::bench::BenchArgs),
}

#[derive(Debug, clap::Args)]
pub struct PluginsArgs {
    /// The host's base URL.
    #[arg(long, env = "OWLERY_URL", default_value = "http://127.0.0.1:8080", global = true)]
    pub url: String,
    /// A token with the admin scope, sent as `Authorization: Bearer` (needed by any host
    /// with auth on: every host not on loopback).
    #[arg(long, env = "OWLERY_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print the host's JSON answer as it is (for scripts), instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub action: PluginAction,
}

#[derive(Debug, Subcommand)]
pub enum PluginAction {
    /// Every plugin with its version, state, offsets and lag.
    List,
    /// One plugin's status.
    Status {
        name: String,
    },
    /// Install or replace a plugin from a .wasm file (name: the file's stem unless given).
    Upload {
        wasm: PathBuf,
        #[arg(long)]
        name: Option<String>,
        /// Manifest file [default: the .toml beside the .wasm, if any].
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Stop a plugin and delete its files; --purge also drops its offsets and state.
    Remove {
        name: String,
        #[arg(long)]
        purge: bool,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Reset a plugin's state and offsets and run it again (from offset 0, or from the
    /// first event at or after --timestamp).
    Replay {
        name: String,
        #[arg(long)]
        timestamp: Option<String>,
    },
    /// Run a candidate version from offset 0 beside the live one, effects suppressed.
    Shadow {
        name: String,
        wasm: PathBuf,
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Swap the caught-up shadow in (--force: even if it still lags).
    Promote {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Stop and drop the shadow.
    Discard {
        name: String,
    },
}

/// `owlery serve`'s flags: one overlay over `owlery.toml`, in the file's shape (a flag's
/// key is the file's key; unset flags leave the file's value).
#[derive(Debug, clap::Args, Serialize)]
pub struct ServeArgs {
    /// Configuration file (default: ./owlery.toml if present).
    #[arg(long, env = "OWLERY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "OWLERY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where the log, plugin state and compiled plugins live [default: data].
    #[arg(long, env = "OWLERY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory of NAME.wasm plugins and their NAME.toml manifests [default: plugins].
    #[arg(long, env = "OWLERY_PLUGINS_DIR")]
    pub plugins_dir: Option<PathBuf>,
    /// Partitions per topic for new topics of the embedded log [default: 4].
    #[arg(long, env = "OWLERY_PARTITIONS")]
    pub partitions: Option<u32>,
    /// Which log to use [default: embedded].
    #[arg(long, env = "OWLERY_LOG", value_enum)]
    pub log: Option<LogBackend>,
    /// How log lines are written: text, or json (one object per line) [default: text].
    #[arg(long, env = "OWLERY_LOG_FORMAT", value_enum)]
    pub log_format: Option<crate::config::LogFormat>,
    /// Secret shared by hosts on one log: keys output ids and signs fan-out records (32+ bytes).
    #[arg(long, env = "OWLERY_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    #[command(flatten)]
    pub iggy: IggyArgs,
    #[command(flatten)]
    pub routing: RoutingArgs,
}

/// The `[routing]` part of the overlay; the environment names are the ones the incident
/// map's deployment already sets.
#[derive(Debug, clap::Args, Serialize)]
pub struct RoutingArgs {
    /// Topic of incident, comment and severity events [default: incident-events].
    #[arg(long, env = "IGGY_INCIDENT_TOPIC")]
    pub incident_topic: Option<String>,
    /// Topic of presence events [default: presence-events].
    #[arg(long, env = "IGGY_PRESENCE_TOPIC")]
    pub presence_topic: Option<String>,
}

/// The `[iggy]` part of the overlay.
#[derive(Debug, clap::Args, Serialize)]
pub struct IggyArgs {
    /// Iggy server host [default: 127.0.0.1].
    #[arg(id = "iggy_host", long = "iggy-host", env = "IGGY_HOST")]
    pub host: Option<String>,
    /// Iggy server TCP port [default: 8090].
    #[arg(id = "iggy_port", long = "iggy-port", env = "IGGY_PORT")]
    pub port: Option<u16>,
    #[arg(id = "iggy_username", long = "iggy-username", env = "IGGY_USERNAME")]
    pub username: Option<String>,
    #[arg(id = "iggy_password", long = "iggy-password", env = "IGGY_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Iggy stream holding Owlery's topics [default: owlery].
    #[arg(id = "iggy_stream", long = "iggy-stream", env = "OWLERY_IGGY_STREAM")]
    pub stream: Option<String>,
    /// The same, under the name the incident map's deployment sets (OWLERY_IGGY_STREAM wins).
    #[arg(id = "iggy_stream_name", long = "iggy-stream-name", env = "IGGY_STREAM_NAME", hide = true)]
    #[serde(skip)]
    pub stream_name: Option<String>,
    /// Partitions of each topic Owlery creates in Iggy [default: 1].
    #[arg(id = "iggy_partitions", long = "iggy-partitions", env = "OWLERY_IGGY_PARTITIONS")]
    pub partitions: Option<u32>,
}

impl ServeArgs {
    /// Defaults, then the file, then environment and flags.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let mut overlay = toml::Table::try_from(self)?;
        if let (None, Some(name)) = (&self.iggy.stream, &self.iggy.stream_name)
            && let Some(toml::Value::Table(iggy)) = overlay.get_mut("iggy")
        {
            iggy.insert("stream".into(), name.clone().into());
        }
        match &self.config {
            Some(path) => Config::load(path, true, overlay),
            None => Config::load(Path::new("owlery.toml"), false, overlay),
        }
    }
}

/// The request with the component as its body and its manifest (the one named, else the
/// `.toml` beside the `.wasm`, if any) as `?manifest=`.
fn with_component(
    request: reqwest::RequestBuilder,
    wasm: &Path,
    manifest: Option<&PathBuf>,
) -> anyhow::Result<reqwest::RequestBuilder> {
    use anyhow::Context;
    let bytes = std::fs::read(wasm).with_context(|| format!("reading {}", wasm.display()))?;
    let manifest = match manifest {
        Some(path) => Some(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?),
        None => std::fs::read_to_string(wasm.with_extension("toml")).ok(),
    };
    let request = request.header(reqwest::header::CONTENT_TYPE, "application/wasm").body(bytes);
    Ok(match manifest {
        Some(text) => request.query(&[("manifest", text)]),
        None => request,
    })
}

/// A plugin name as the host takes it, checked before it goes into a URL's path: a name like
/// `a/../../x` must not send the token to another route.
fn checked(name: &str) -> anyhow::Result<&str> {
    crate::plugins::check_name(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(name)
}

/// Run a `plugins` subcommand against a host; prints the host's JSON answer.
pub async fn run_plugins(args: PluginsArgs) -> anyhow::Result<()> {
    use anyhow::{Context, bail};
    let base = args.url.trim_end_matches('/').to_owned();
    let http = reqwest::Client::new();
    let url = |path: String| format!("{base}/api/plugins{path}");
    let request = match &args.action {
        PluginAction::List => http.get(url(String::new())),
        PluginAction::Status { name } => http.get(url(format!("/{}", checked(name)?))),
        PluginAction::Upload { wasm, name, manifest } => {
            let name = match name {
                Some(name) => name.clone(),
                None => wasm
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .context("cannot tell the plugin's name; use --name")?
                    .to_owned(),
            };
            with_component(http.put(url(format!("/{}", checked(&name)?))), wasm, manifest.as_ref())?
        }
        PluginAction::Remove { name, purge } => {
            http.delete(url(format!("/{}", checked(name)?))).query(&[("purge", purge)])
        }
        PluginAction::Pause { name } => http.post(url(format!("/{}/pause", checked(name)?))),
        PluginAction::Resume { name } => http.post(url(format!("/{}/resume", checked(name)?))),
        PluginAction::Replay { name, timestamp } => {
            let body = match timestamp {
                Some(at) => serde_json::json!({ "timestamp": at }),
                None => serde_json::json!({ "from": 0 }),
            };
            http.post(url(format!("/{}/replay", checked(name)?))).json(&body)
        }
        PluginAction::Shadow { name, wasm, manifest } => {
            with_component(http.post(url(format!("/{}/shadow", checked(name)?))), wasm, manifest.as_ref())?
        }
        PluginAction::Promote { name, force } => {
            http.post(url(format!("/{}/promote", checked(name)?))).query(&[("force", force)])
        }
        PluginAction::Discard { name } => http.delete(url(format!("/{}/shadow", checked(name)?))),
    };
    let request = match &args.token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let response = request.send().await.with_context(|| format!("cannot reach the host at {base}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let body: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    if !status.is_success() {
        // The host's own words: its `error`, and the field it names.
        let message = body.get("error").and_then(|e| e.as_str()).map_or_else(|| body.to_string(), str::to_owned);
        let field = body.get("field").and_then(|f| f.as_str()).map(|f| format!(" (field {f})")).unwrap_or_default();
        let hint = if status == reqwest::StatusCode::UNAUTHORIZED && args.token.is_none() {
            "\n(this host wants a token: --token or OWLERY_TOKEN)"
        } else {
            ""
        };
        bail!("the host answered {status}: {message}{field}{hint}");
    }
    if args.json {
        println!("{body}");
        return Ok(());
    }
    match &args.action {
        PluginAction::List => {
            let plugins = body["plugins"].as_array().cloned().unwrap_or_default();
            println!(
                "{:<20} {:<10} {:<12} {:>8} {:>10} {:>6} {:>9}",
                "NAME", "STATE", "VERSION", "LAG", "PROCESSED", "DEAD", "EVENTS/S"
            );
            for p in &plugins {
                println!(
                    "{:<20} {:<10} {:<12} {:>8} {:>10} {:>6} {:>9.1}",
                    p["name"].as_str().unwrap_or("?"),
                    p["state"].as_str().unwrap_or("?"),
                    short_version(p),
                    p["lag"],
                    p["processed"],
                    p["deadLetters"],
                    p["eventsPerSecond"].as_f64().unwrap_or(0.0)
                );
            }
        }
        PluginAction::Status { .. } => print!("{}", readable_status(&body)),
        _ => println!("{}", serde_json::to_string_pretty(&body)?),
    }
    Ok(())
}

fn short_version(status: &serde_json::Value) -> &str {
    let version = status["version"].as_str().unwrap_or("?");
    &version[..version.len().min(12)]
}

/// One plugin's status (`GET /api/plugins/NAME`) for people.
pub fn readable_status(s: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}  {}  version {}",
        s["name"].as_str().unwrap_or("?"),
        s["state"].as_str().unwrap_or("?"),
        short_version(s)
    );
    let _ = writeln!(
        out,
        "  processed {}  errors {}  dead letters {}  lag {}  events/s {:.1}  batches {} (avg {} us)",
        s["processed"],
        s["errors"],
        s["deadLetters"],
        s["lag"],
        s["eventsPerSecond"].as_f64().unwrap_or(0.0),
        s["batches"],
        s["avgBatchMicros"]
    );
    if let Some(topics) = s["offsets"].as_object() {
        for (topic, partitions) in topics {
            let each: Vec<String> =
                partitions.as_object().map(|p| p.iter().map(|(n, o)| format!("{n}:{o}")).collect()).unwrap_or_default();
            let _ = writeln!(out, "  next offsets  {topic}  {}", each.join(" "));
        }
    }
    if let Some(error) = s["lastError"].as_str() {
        let _ = writeln!(out, "  last error: {error}");
    }
    if s["replay"].is_object() {
        let r = &s["replay"];
        let finished = r["finishedAt"].as_str().map(|at| format!(", finished {at}")).unwrap_or_default();
        let _ = writeln!(
            out,
            "  replay: {} of {} (started {}{finished})",
            r["done"],
            r["total"],
            r["startedAt"].as_str().unwrap_or("?")
        );
    }
    if s["shadow"].is_object() {
        let sh = &s["shadow"];
        let _ = writeln!(
            out,
            "  shadow: version {}  {}  lag {}  caught up: {}",
            short_version(sh),
            sh["state"].as_str().unwrap_or("?"),
            sh["lag"],
            if sh["caughtUp"] == true { "yes" } else { "no" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    #[test]
    fn flags_are_one_overlay_in_the_files_shape() {
        let cli = Cli::try_parse_from([
            "owlery",
            "serve",
            "--config",
            "/nonexistent/owlery.toml",
            "--partitions",
            "2",
            "--iggy-port",
            "9100",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else { panic!("serve") };
        let overlay = toml::Table::try_from(&args).unwrap();
        assert_eq!(overlay.to_string(), "partitions = 2\n\n[iggy]\nport = 9100\n\n[routing]\n");
        let error = args.config().unwrap_err().to_string();
        assert!(error.contains("/nonexistent/owlery.toml"), "an explicit file must exist: {error}");
    }

    #[test]
    fn the_incident_maps_names_for_stream_and_topics_are_understood() {
        let cli = Cli::try_parse_from([
            "owlery",
            "serve",
            "--iggy-stream-name",
            "incidents",
            "--incident-topic",
            "incident_events",
            "--presence-topic",
            "presence_events",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else { panic!("serve") };
        let config = args.config().unwrap();
        assert_eq!(config.iggy.stream, "incidents");
        assert_eq!(config.routing.incident_topic, "incident_events");
        let routing = owlery_routing(&config);
        assert_eq!(routing.topic_for("incident.updated"), "incident_events");
        assert_eq!(routing.topic_for("user.joined_room"), "presence_events");
        // OWLERY_IGGY_STREAM's flag wins over the alias.
        let cli = Cli::try_parse_from(["owlery", "serve", "--iggy-stream-name", "a", "--iggy-stream", "b"]).unwrap();
        let Command::Serve(args) = cli.command else { panic!("serve") };
        assert_eq!(args.config().unwrap().iggy.stream, "b");
    }

    fn owlery_routing(config: &crate::config::Config) -> crate::routing::Routing {
        crate::routing::Routing::from_config(&config.routing).unwrap()
    }
}
