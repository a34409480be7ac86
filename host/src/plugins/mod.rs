//! The plugin registry: loads `NAME.wasm` (+ `NAME.toml`) from the plugins directory, runs
//! one runner thread per plugin, and answers status and query requests.

pub mod manifest;
pub mod runner;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, oneshot};

use crate::envelope::Routing;
use crate::fanout::Hub;
use crate::log::EventLog;
use crate::runtime::Runtime;
use crate::store::Store;
use manifest::Manifest;
use runner::{Command, PluginStatus, RunState, Runner};

/// What every runner shares.
pub struct RunnerDeps {
    pub runtime: Arc<Runtime>,
    pub log: Arc<dyn EventLog>,
    pub store: Arc<Store>,
    pub routing: Arc<Routing>,
    pub hub: Hub,
    /// Poked after a commit that put events in the outbox.
    pub outbox: Arc<Notify>,
    pub tokio: tokio::runtime::Handle,
}

impl RunnerDeps {
    /// Runners are plain threads; they reach the async log through this.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.tokio.block_on(future)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("no plugin named {0:?}")]
    NotFound(String),
    #[error("plugin {name:?}: {message}")]
    Failed { name: String, message: String },
    #[error("plugin {0:?} is not running")]
    NotRunning(String),
}

struct Running {
    status: Arc<Mutex<PluginStatus>>,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub struct Plugins {
    deps: Arc<RunnerDeps>,
    running: Mutex<BTreeMap<String, Running>>,
}

/// Plugin names: the file stem; letters, digits, `-` and `_`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("{name:?} is not a plugin name (1 to 64 letters, digits, '-' or '_')"));
    }
    Ok(())
}

impl Plugins {
    pub fn new(deps: Arc<RunnerDeps>) -> Plugins {
        Plugins { deps, running: Mutex::new(BTreeMap::new()) }
    }

    /// Load every `*.wasm` of `dir`. A plugin that fails to load is listed as failed with
    /// its error; the others start regardless.
    pub fn load_dir(&self, dir: &Path) -> std::io::Result<()> {
        let mut wasm_files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "wasm") && p.is_file())
            .collect();
        wasm_files.sort();
        for path in wasm_files {
            let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else { continue };
            if let Err(e) = check_name(&name) {
                tracing::warn!(path = %path.display(), "ignoring: {e}");
                continue;
            }
            if let Err(message) = self.load_file(&name, &path) {
                tracing::error!(plugin = %name, error = %message, "plugin not loaded");
                let mut status = PluginStatus::new(&name, "");
                status.state = RunState::Failed;
                status.last_error = Some(message);
                self.insert(&name, Arc::new(Mutex::new(status)), None);
            }
        }
        Ok(())
    }

    fn load_file(&self, name: &str, wasm_path: &Path) -> Result<(), String> {
        let manifest_path = wasm_path.with_extension("toml");
        let manifest = match std::fs::read_to_string(&manifest_path) {
            Ok(text) => Manifest::parse(&text).map_err(|e| format!("{}: {e}", manifest_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest::default(),
            Err(e) => return Err(format!("{}: {e}", manifest_path.display())),
        };
        let wasm = std::fs::read(wasm_path).map_err(|e| format!("{}: {e}", wasm_path.display()))?;
        self.start(name, &wasm, manifest)
    }

    /// Compile, validate and start a plugin.
    pub fn start(&self, name: &str, wasm: &[u8], manifest: Manifest) -> Result<(), String> {
        let component = self.deps.runtime.load(wasm).map_err(|e| e.to_string())?;
        let status = Arc::new(Mutex::new(PluginStatus::new(name, &component.hash)));
        let (tx, rx) = mpsc::unbounded_channel();
        let runner = Runner::new(name, manifest, component, self.deps.clone(), status.clone(), rx);
        let thread = std::thread::Builder::new()
            .name(format!("plugin-{name}"))
            .spawn(move || runner.run())
            .map_err(|e| e.to_string())?;
        self.insert(name, status, Some((tx, thread)));
        Ok(())
    }

    fn insert(
        &self,
        name: &str,
        status: Arc<Mutex<PluginStatus>>,
        runner: Option<(mpsc::UnboundedSender<Command>, std::thread::JoinHandle<()>)>,
    ) {
        let (commands, thread) = match runner {
            Some((tx, thread)) => (tx, Some(thread)),
            None => (mpsc::unbounded_channel().0, None),
        };
        let previous =
            self.running.lock().expect("registry lock").insert(name.to_owned(), Running { status, commands, thread });
        if let Some(previous) = previous {
            stop(previous);
        }
    }

    pub fn list(&self) -> Vec<PluginStatus> {
        self.running
            .lock()
            .expect("registry lock")
            .values()
            .map(|r| r.status.lock().expect("status lock").clone())
            .collect()
    }

    pub fn status(&self, name: &str) -> Result<PluginStatus, PluginError> {
        let running = self.running.lock().expect("registry lock");
        let r = running.get(name).ok_or_else(|| PluginError::NotFound(name.to_owned()))?;
        Ok(r.status.lock().expect("status lock").clone())
    }

    /// Run the plugin's `query` with `request` (JSON) on its runner, between batches.
    pub async fn query(&self, name: &str, request: String) -> Result<String, PluginError> {
        let (reply, answer) = oneshot::channel();
        {
            let running = self.running.lock().expect("registry lock");
            let r = running.get(name).ok_or_else(|| PluginError::NotFound(name.to_owned()))?;
            r.commands.send(Command::Query { request, reply }).map_err(|_| PluginError::NotRunning(name.to_owned()))?;
        }
        let answer = answer.await.map_err(|_| PluginError::NotRunning(name.to_owned()))?;
        answer.map_err(|message| PluginError::Failed { name: name.to_owned(), message })
    }

    /// Stop every runner and wait for it to finish its batch.
    pub fn stop_all(&self) {
        let all = std::mem::take(&mut *self.running.lock().expect("registry lock"));
        for (_, r) in all {
            stop(r);
        }
    }
}

fn stop(r: Running) {
    let _ = r.commands.send(Command::Stop);
    if let Some(thread) = r.thread {
        let _ = thread.join();
    }
}
