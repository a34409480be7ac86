//! The command line: `owlery serve`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigFile};

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
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (default: ./owlery.toml if present).
    #[arg(long, env = "OWLERY_CONFIG")]
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
}

impl ServeArgs {
    /// Defaults, then the file, then environment and flags.
    pub fn config(&self) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(path) => ConfigFile::load(path, true)?,
            None => ConfigFile::load(std::path::Path::new("owlery.toml"), false)?,
        };
        let mut config = Config::from_file(file);
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(dir) = &self.plugins_dir {
            config.plugins_dir = dir.clone();
        }
        if let Some(partitions) = self.partitions {
            config.partitions = partitions;
        }
        config.validate()?;
        Ok(config)
    }
}
