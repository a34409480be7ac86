//! The plugin registry: loads `NAME.wasm` (+ `NAME.toml`) from the plugins directory, runs
//! one runner thread per plugin (and per shadow), and carries out the lifecycle: install
//! or swap a version, remove, pause, resume, replay, shadow, promote.

pub mod manifest;
pub mod runner;
pub mod watcher;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::runtime::{CallError, Interrupt, LoadedComponent, RuntimeError};
use crate::store::StoreError;
use manifest::{Manifest, ManifestError};
use runner::{
    Command, Mode, PluginStatus, ReplayFrom, RunState, Runner, RunnerError, RunnerHandle, RunnerSpec, SharedStatus,
};
use tokio_util::sync::CancellationToken;

pub use runner::RunnerDeps;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("no plugin named {0:?}")]
    NotFound(String),
    #[error("plugin {name:?}: {cause}")]
    Failed {
        name: String,
        #[source]
        cause: Failure,
    },
    #[error("plugin {0:?} is not running")]
    NotRunning(String),
    // What was offered is not acceptable: nothing was replaced.
    #[error(transparent)]
    BadName(#[from] BadName),
    #[error("manifest: {0}")]
    BadManifest(#[from] ManifestError),
    #[error(transparent)]
    BadComponent(#[from] RuntimeError),
    /// The new version did not start; the old one keeps running.
    #[error(transparent)]
    NotStarted(RunnerError),
    #[error("plugin {0:?} has no shadow")]
    NoShadow(String),
    /// A new plugin did not start; nothing was installed.
    #[error("plugin {name:?} did not start: {error}")]
    StartFailed { name: String, error: String },
    /// Its `max_queued_queries` queries are waiting already.
    #[error("plugin {0:?} has too many queries waiting; try again later")]
    Busy(String),
    /// A query not answered within `query_timeout_ms`, waiting for a batch in progress
    /// included.
    #[error("plugin {name:?} did not answer the query within {ms} ms (query_timeout_ms)")]
    NoAnswer { name: String, ms: u128 },
    #[error("the shadow of {name:?} is {lag} events behind; wait until it has caught up or use force")]
    ShadowBehind { name: String, lag: u64 },
}

/// Why an operation on a plugin that exists failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Runner(#[from] RunnerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The version runs, but its files could not be written: a restart loses it.
    #[error("{done}, but not saved: {source}")]
    NotSaved { done: &'static str, source: std::io::Error },
}

impl PluginError {
    /// A call into the plugin ran past its deadline.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            PluginError::NoAnswer { .. }
                | PluginError::Failed { cause: Failure::Runner(RunnerError::Call(CallError::Timeout(_))), .. }
        )
    }
}

fn failed(name: &str, cause: impl Into<Failure>) -> PluginError {
    PluginError::Failed { name: name.to_owned(), cause: cause.into() }
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a plugin name (1 to 64 letters, digits, '-' or '_')")]
pub struct BadName(String);

struct Running {
    status: SharedStatus,
    commands: mpsc::UnboundedSender<Command>,
    /// Ends the runner's call in progress when it is stopped.
    cancel: CancellationToken,
    /// Ends a long `handle` call so that a command is answered promptly.
    interrupt: Interrupt,
    thread: Option<std::thread::JoinHandle<()>>,
    /// What the plugin runs now (absent when it never loaded).
    hash: Option<String>,
    manifest_text: Option<String>,
    shadow: Option<Box<Shadow>>,
}

struct Shadow {
    running: Running,
    component: LoadedComponent,
    manifest: Manifest,
    /// Kept to be written into the plugins directory on promotion.
    wasm: Vec<u8>,
    manifest_text: Option<String>,
}

/// What `install` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    Started,
    Swapped,
    Unchanged,
}

pub struct Plugins {
    deps: Arc<RunnerDeps>,
    /// The watched directory: uploads and promotions are written here to last.
    dir: PathBuf,
    running: Mutex<BTreeMap<String, Running>>,
    /// One install or removal at a time (watcher, uploads and start-up all install).
    changing: Mutex<()>,
    /// One shadow change at a time (start, discard, promote): two shadow uploads at once
    /// would otherwise leave one runner unlisted, still writing into the shadow key space.
    shadows: tokio::sync::Mutex<()>,
}

/// Plugin names: the file stem; letters, digits, `-` and `_`.
pub fn check_name(name: &str) -> Result<(), BadName> {
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(BadName(name.to_owned()));
    }
    Ok(())
}

fn shadow_namespace(name: &str) -> String {
    format!("{name}@shadow")
}

impl Plugins {
    pub fn new(deps: Arc<RunnerDeps>, dir: PathBuf) -> Plugins {
        Plugins {
            deps,
            dir,
            running: Mutex::new(BTreeMap::new()),
            changing: Mutex::new(()),
            shadows: tokio::sync::Mutex::new(()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Load every `*.wasm` of `dir`. A plugin that fails to load is listed as failed with
    /// its error; the others start regardless.
    pub fn load_dir(&self) -> std::io::Result<()> {
        self.finish_promotions();
        let dir = self.dir.clone();
        let mut names: Vec<String> = std::fs::read_dir(dir)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "wasm") && p.is_file())
            .filter_map(|p| p.file_stem().and_then(|s| s.to_str()).map(str::to_owned))
            .filter(|name| !name.starts_with('.'))
            .collect();
        names.sort();
        for name in names {
            self.reconcile(&name);
        }
        Ok(())
    }

    /// Bring plugin `name` in line with the files in `dir`: start it, swap in a changed
    /// version or manifest, or stop it when its `.wasm` is gone (keeping its offsets).
    pub fn reconcile(&self, name: &str) {
        let dir = &self.dir;
        if let Err(e) = check_name(name) {
            tracing::warn!(dir = %dir.display(), "ignoring a file: {e}");
            return;
        }
        let wasm_path = dir.join(format!("{name}.wasm"));
        let manifest_path = dir.join(format!("{name}.toml"));
        let wasm = match std::fs::read(&wasm_path) {
            Ok(wasm) => wasm,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if self.lock().contains_key(name) {
                    tracing::info!(plugin = name, "plugin file removed; stopping it (its offsets are kept)");
                    let _ = self.remove(name, false);
                }
                return;
            }
            Err(e) => {
                self.record_load_error(name, format!("{}: {e}", wasm_path.display()));
                return;
            }
        };
        let manifest_text = match std::fs::read_to_string(&manifest_path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                self.record_load_error(name, format!("{}: {e}", manifest_path.display()));
                return;
            }
        };
        match self.install(name, &wasm, manifest_text.as_deref()) {
            Ok(Installed::Unchanged) => {}
            Ok(done) => tracing::info!(plugin = name, ?done, "plugin loaded from {}", wasm_path.display()),
            Err(e) => self.record_load_error(name, e.to_string()),
        }
    }

    /// A version that could not be loaded: the running one (if any) stays; the error shows
    /// in the status and the log.
    fn record_load_error(&self, name: &str, message: String) {
        tracing::error!(plugin = name, error = %message, "plugin not loaded");
        let mut running = self.lock();
        match running.get(name) {
            Some(r) => r.status.note_error(format!("load failed: {message}")),
            None => {
                let mut status = PluginStatus::new(name, "");
                status.state = RunState::Failed;
                status.last_error = Some(message);
                let (commands, _) = mpsc::unbounded_channel();
                running.insert(
                    name.to_owned(),
                    Running {
                        status: SharedStatus::new(status),
                        commands,
                        cancel: CancellationToken::new(),
                        interrupt: Interrupt::default(),
                        thread: None,
                        hash: None,
                        manifest_text: None,
                        shadow: None,
                    },
                );
            }
        }
    }

    fn parse_manifest(text: Option<&str>) -> Result<Manifest, PluginError> {
        match text {
            Some(text) => Ok(Manifest::parse(text)?),
            None => Ok(Manifest::default()),
        }
    }

    /// Validate, compile and run `wasm` as plugin `name`: a new plugin starts; a running one
    /// swaps to it at a batch boundary, keeping offsets and state. Nothing is replaced
    /// unless the component compiles, implements the world and starts. Blocking.
    pub fn install(&self, name: &str, wasm: &[u8], manifest_text: Option<&str>) -> Result<Installed, PluginError> {
        check_name(name)?;
        // Compiled before taking the lock: compiling (up to `compile_timeout_ms`) never
        // holds up other plugins' changes.
        let manifest = Self::parse_manifest(manifest_text)?;
        let component = self.deps.runtime.load(wasm)?;
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let commands = {
            let running = self.lock();
            match running.get(name) {
                Some(r) if r.thread.is_some() => {
                    if r.hash.as_deref() == Some(component.hash.as_str()) && r.manifest_text.as_deref() == manifest_text
                    {
                        return Ok(Installed::Unchanged);
                    }
                    Some((r.commands.clone(), r.interrupt.clone()))
                }
                _ => None,
            }
        };
        let hash = component.hash.clone();
        let Some((commands, interrupt)) = commands else {
            self.spawn_live(name, component, manifest, manifest_text)?;
            return Ok(Installed::Started);
        };
        let (reply, answer) = oneshot::channel();
        deliver(&commands, &interrupt, Command::Swap { component, manifest: Box::new(manifest), reply })
            .map_err(|_| PluginError::NotRunning(name.to_owned()))?;
        answer
            .blocking_recv()
            .map_err(|_| PluginError::NotRunning(name.to_owned()))?
            .map_err(PluginError::NotStarted)?;
        if let Some(r) = self.lock().get_mut(name) {
            r.hash = Some(hash);
            r.manifest_text = manifest_text.map(str::to_owned);
        }
        Ok(Installed::Swapped)
    }

    fn spawn(&self, spec: RunnerSpec) -> Result<Running, PluginError> {
        let name = spec.name.clone();
        let hash = spec.component.hash.clone();
        let label = if spec.mode == Mode::Shadow { format!("shadow-{name}") } else { format!("plugin-{name}") };
        let (runner, RunnerHandle { status, commands, cancel, interrupt }) = Runner::new(spec, self.deps.clone());
        let (ready, started) = oneshot::channel();
        let thread =
            std::thread::Builder::new().name(label).spawn(move || runner.run(ready)).map_err(|e| failed(&name, e))?;
        // Its status is meaningful from here on.
        let _ = started.blocking_recv();
        Ok(Running {
            status,
            commands,
            cancel,
            interrupt,
            thread: Some(thread),
            hash: Some(hash),
            manifest_text: None,
            shadow: None,
        })
    }

    fn spawn_live(
        &self,
        name: &str,
        component: LoadedComponent,
        manifest: Manifest,
        manifest_text: Option<&str>,
    ) -> Result<(), PluginError> {
        let spec =
            RunnerSpec { name: name.to_owned(), namespace: name.to_owned(), mode: Mode::Live, component, manifest };
        let mut running = self.spawn(spec)?;
        running.manifest_text = manifest_text.map(str::to_owned);
        let previous = self.lock().insert(name.to_owned(), running);
        if let Some(previous) = previous {
            stop(previous);
        }
        Ok(())
    }

    /// Stop a plugin (and its shadow). Its offsets and state stay unless `purge`.
    pub fn remove(&self, name: &str, purge: bool) -> Result<(), PluginError> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let removed = self.lock().remove(name);
        let Some(removed) = removed else {
            if purge {
                self.purge(name)?;
            }
            return Err(PluginError::NotFound(name.to_owned()));
        };
        stop(removed);
        if purge {
            self.purge(name)?;
        }
        Ok(())
    }

    fn purge(&self, name: &str) -> Result<(), PluginError> {
        for namespace in [name.to_owned(), shadow_namespace(name)] {
            self.deps.store.reset_plugin(&namespace).map_err(|e| failed(name, e))?;
        }
        Ok(())
    }

    fn send(&self, name: &str, command: Command) -> Result<(), PluginError> {
        let running = self.lock();
        let r = running.get(name).ok_or_else(|| PluginError::NotFound(name.to_owned()))?;
        if r.thread.is_none() {
            return Err(PluginError::NotRunning(name.to_owned()));
        }
        deliver(&r.commands, &r.interrupt, command).map_err(|_| PluginError::NotRunning(name.to_owned()))
    }

    /// Send the command `make` builds and wait for the runner's answer.
    async fn ask<T>(
        &self,
        name: &str,
        make: impl FnOnce(oneshot::Sender<Result<T, RunnerError>>) -> Command,
    ) -> Result<T, PluginError> {
        let (reply, answer) = oneshot::channel();
        self.send(name, make(reply))?;
        answer.await.map_err(|_| PluginError::NotRunning(name.to_owned()))?.map_err(|e| failed(name, e))
    }

    pub async fn pause(&self, name: &str) -> Result<(), PluginError> {
        self.ask(name, Command::Pause).await
    }

    pub async fn resume(&self, name: &str) -> Result<(), PluginError> {
        self.ask(name, Command::Resume).await
    }

    /// Reset the plugin's state and offsets and run it again from `from`.
    pub async fn replay(&self, name: &str, from: ReplayFrom) -> Result<(), PluginError> {
        self.ask(name, |reply| Command::Replay { from, reply }).await
    }

    /// Run a candidate version from offset zero beside the live one, in its own key space,
    /// with its broadcasts and publishes dropped. Replaces an earlier shadow. Blocking.
    pub fn start_shadow(&self, name: &str, wasm: &[u8], manifest_text: Option<&str>) -> Result<(), PluginError> {
        let _one_at_a_time = self.shadows.blocking_lock();
        let manifest_text = match manifest_text {
            Some(text) => Some(text.to_owned()),
            None => self.lock().get(name).ok_or_else(|| PluginError::NotFound(name.to_owned()))?.manifest_text.clone(),
        };
        let manifest = Self::parse_manifest(manifest_text.as_deref())?;
        let component = self.deps.runtime.load(wasm)?;
        if self.lock().get(name).is_none_or(|r| r.thread.is_none()) {
            return Err(PluginError::NotFound(name.to_owned()));
        }
        self.discard_shadow_locked(name).ok();
        let running = self.spawn(RunnerSpec {
            name: name.to_owned(),
            namespace: shadow_namespace(name),
            mode: Mode::Shadow,
            component: component.clone(),
            manifest: manifest.clone(),
        })?;
        let mut plugins = self.lock();
        match plugins.get_mut(name) {
            Some(live) => {
                live.shadow =
                    Some(Box::new(Shadow { running, component, manifest, wasm: wasm.to_vec(), manifest_text }));
                Ok(())
            }
            None => {
                drop(plugins);
                stop(running);
                Err(PluginError::NotFound(name.to_owned()))
            }
        }
    }

    /// Blocking.
    pub fn discard_shadow(&self, name: &str) -> Result<(), PluginError> {
        let _one_at_a_time = self.shadows.blocking_lock();
        self.discard_shadow_locked(name)
    }

    fn discard_shadow_locked(&self, name: &str) -> Result<(), PluginError> {
        let shadow = self.take_shadow(name)?;
        stop(shadow.running);
        self.deps.store.reset_plugin(&shadow_namespace(name)).map_err(|e| failed(name, e))
    }

    /// The shadow of `name`, no longer listed with it.
    fn take_shadow(&self, name: &str) -> Result<Box<Shadow>, PluginError> {
        let mut plugins = self.lock();
        let live = plugins.get_mut(name).ok_or_else(|| PluginError::NotFound(name.to_owned()))?;
        live.shadow.take().ok_or_else(|| PluginError::NoShadow(name.to_owned()))
    }

    /// Swap the shadow in: the live plugin takes its version, state and offsets in one
    /// step between two batches. Refused while the shadow still lags, unless `force`.
    pub async fn promote(&self, name: &str, force: bool, shadow_lag: u64) -> Result<(), PluginError> {
        if shadow_lag > 0 && !force {
            return Err(PluginError::ShadowBehind { name: name.to_owned(), lag: shadow_lag });
        }
        let _one_at_a_time = self.shadows.lock().await;
        let shadow = self.take_shadow(name)?;
        let Shadow { running, component, manifest, wasm, manifest_text } = *shadow;
        let hash = component.hash.clone();
        tokio::task::block_in_place(|| stop(running));
        let version = saved_version::encode(&wasm, manifest_text.as_deref());
        self.ask(name, |reply| Command::Promote {
            shadow_namespace: shadow_namespace(name),
            component,
            manifest: Box::new(manifest),
            version,
            reply,
        })
        .await?;
        if let Some(flag) = std::env::var_os(CRASH_AFTER_PROMOTION)
            && std::fs::remove_file(&flag).is_ok()
        {
            // The crash test's worst moment: committed, files not written yet.
            std::process::abort();
        }
        if let Some(live) = self.lock().get_mut(name) {
            live.hash = Some(hash);
            live.manifest_text.clone_from(&manifest_text);
        }
        self.save_promotion(name, &wasm, manifest_text.as_deref())
            .map_err(|source| failed(name, Failure::NotSaved { done: "promoted", source }))
    }

    /// Write a promoted version's files, then forget the store's copy of it.
    fn save_promotion(&self, name: &str, wasm: &[u8], manifest_text: Option<&str>) -> std::io::Result<()> {
        self.write_files(name, wasm, manifest_text)?;
        self.deps.store.promotion_saved(name).map_err(std::io::Error::other)
    }

    /// Promotions committed before a crash whose files were not written: write them now,
    /// before the directory is loaded, so each plugin starts as the version its state is.
    fn finish_promotions(&self) {
        let pending = match self.deps.store.promotions() {
            Ok(pending) => pending,
            Err(error) => return tracing::error!(%error, "reading the promotions under way failed"),
        };
        for (name, version) in pending {
            let saved = saved_version::decode(&version)
                .and_then(|(wasm, manifest)| self.save_promotion(&name, wasm, manifest.as_deref()));
            match saved {
                Ok(()) => {
                    tracing::info!(plugin = %name, "finished writing the files of a promotion a stop interrupted")
                }
                Err(error) => tracing::error!(plugin = %name, %error, "writing the files of a promoted version failed"),
            }
        }
    }

    /// `install`, then keep the files in the plugins directory so the version outlives a
    /// restart. Blocking.
    /// Without a manifest, a plugin that exists keeps its own.
    pub fn upload(&self, name: &str, wasm: &[u8], manifest_text: Option<&str>) -> Result<Installed, PluginError> {
        let manifest_text = match manifest_text {
            Some(text) => Some(text.to_owned()),
            None => self.lock().get(name).and_then(|r| r.manifest_text.clone()),
        };
        let manifest_text = manifest_text.as_deref();
        let installed = self.install(name, wasm, manifest_text)?;
        if installed == Installed::Started {
            // A new plugin that did not start (its `init` failed or hung, its memory is over
            // its cap) is refused, not kept as a failed plugin: nothing is saved.
            let (status, _) = self.status(name)?;
            if status.state == RunState::Failed {
                let _ = self.remove(name, false);
                let error = status.last_error.unwrap_or_else(|| "it failed to start".to_owned());
                return Err(PluginError::StartFailed { name: name.to_owned(), error });
            }
        }
        self.write_files(name, wasm, manifest_text)
            .map_err(|source| failed(name, Failure::NotSaved { done: "installed", source }))?;
        Ok(installed)
    }

    /// `remove`, and delete its files so it does not come back on restart.
    pub fn delete(&self, name: &str, purge: bool) -> Result<(), PluginError> {
        // The name becomes a file path below: never anything but a plain name.
        check_name(name)?;
        let removed = self.remove(name, purge);
        for ext in ["wasm", "toml"] {
            match std::fs::remove_file(self.dir.join(format!("{name}.{ext}"))) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(failed(name, e)),
                _ => {}
            }
        }
        removed
    }

    /// Status of every plugin (with its shadow's, if any).
    pub fn list(&self) -> Vec<(PluginStatus, Option<PluginStatus>)> {
        self.lock().values().map(snapshot).collect()
    }

    pub fn status(&self, name: &str) -> Result<(PluginStatus, Option<PluginStatus>), PluginError> {
        let running = self.lock();
        let r = running.get(name).ok_or_else(|| PluginError::NotFound(name.to_owned()))?;
        Ok(snapshot(r))
    }

    /// Run the plugin's `query` with `request` (JSON) on its runner, between batches;
    /// `Busy` when `max_queued_queries` are already waiting, `NoAnswer` when no answer came
    /// within `query_timeout_ms` (a batch that a query may not end holds the runner: the
    /// asker is answered at its deadline, and the runner then skips the query).
    pub async fn query(&self, name: &str, request: String) -> Result<String, PluginError> {
        let (slot, timeout) = {
            let running = self.lock();
            let r = running.get(name).ok_or_else(|| PluginError::NotFound(name.to_owned()))?;
            (r.status.query_slot().ok_or_else(|| PluginError::Busy(name.to_owned()))?, r.status.query_timeout())
        };
        let asked = self.ask(name, |reply| Command::Query { request, reply });
        let answer = tokio::time::timeout(timeout, asked)
            .await
            .unwrap_or_else(|_| Err(PluginError::NoAnswer { name: name.to_owned(), ms: timeout.as_millis() }));
        // Held by the asker, not the command: one that gave up no longer counts as waiting
        // (its command, still queued behind a batch, is skipped when the runner gets to it).
        drop(slot);
        answer
    }

    /// Stop every runner and wait for them to finish their batches: all are told first,
    /// so the wait is the slowest one's, not the sum.
    pub fn stop_all(&self) {
        let all = std::mem::take(&mut *self.lock());
        let mut threads = Vec::new();
        for (_, r) in all {
            tell_to_stop(r, &mut threads);
        }
        for thread in threads {
            let _ = thread.join();
        }
    }

    fn write_files(&self, name: &str, wasm: &[u8], manifest_text: Option<&str>) -> std::io::Result<()> {
        match manifest_text {
            Some(text) => write_atomically(&self.dir.join(format!("{name}.toml")), text.as_bytes())?,
            None => match std::fs::remove_file(self.dir.join(format!("{name}.toml"))) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            },
        }
        write_atomically(&self.dir.join(format!("{name}.wasm")), wasm)
    }
}

/// Names a file in a host's environment: while that file exists, the host removes it and
/// aborts right after committing a promotion, before the files are written (once: the crash
/// test's way to die at the worst moment, then start again).
const CRASH_AFTER_PROMOTION: &str = "OWLERY_TEST_CRASH_AFTER_PROMOTION";

/// A promoted version as the store keeps it with the promotion: the manifest's length (4
/// bytes, big-endian; all ones for none), the manifest, then the component.
mod saved_version {
    const NO_MANIFEST: u32 = u32::MAX;

    pub fn encode(wasm: &[u8], manifest: Option<&str>) -> Vec<u8> {
        let manifest = manifest.map(str::as_bytes);
        let len = manifest.map_or(NO_MANIFEST, |m| u32::try_from(m.len()).expect("a manifest is under 4 GiB"));
        let mut bytes = Vec::with_capacity(4 + manifest.map_or(0, <[u8]>::len) + wasm.len());
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(manifest.unwrap_or_default());
        bytes.extend_from_slice(wasm);
        bytes
    }

    pub fn decode(bytes: &[u8]) -> std::io::Result<(&[u8], Option<String>)> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "a promoted version that does not read back");
        let (len, rest) = bytes.split_first_chunk::<4>().ok_or_else(bad)?;
        let len = u32::from_be_bytes(*len);
        if len == NO_MANIFEST {
            return Ok((rest, None));
        }
        let (manifest, wasm) = rest.split_at_checked(len as usize).ok_or_else(bad)?;
        Ok((wasm, Some(String::from_utf8(manifest.to_vec()).map_err(|_| bad())?)))
    }

    #[cfg(test)]
    #[test]
    fn reads_back_what_it_wrote() {
        for manifest in [None, Some(""), Some("[limits]\nmemory_mb = 8\n")] {
            let bytes = encode(b"\0asm...", manifest);
            let (wasm, read) = decode(&bytes).unwrap();
            assert_eq!((wasm, read.as_deref()), (&b"\0asm..."[..], manifest));
        }
        assert!(decode(&[0, 0, 0, 9, 1]).is_err() && decode(&[1]).is_err());
    }
}

fn snapshot(r: &Running) -> (PluginStatus, Option<PluginStatus>) {
    let status = r.status.snapshot();
    let shadow = r.shadow.as_ref().map(|s| s.running.status.snapshot());
    (status, shadow)
}

/// Write to a hidden temp file beside `path`, then rename: readers never see half a file.
/// Each write has a temp file of its own (process id and a counter), so two at once, in
/// this process or another sharing the directory, never write into one. Also how the
/// runtime's compile cache writes. A temp file left by a failed write is removed: its name
/// is never used again, so nothing else would.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("plugin");
    let tmp: PathBuf = path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn stop(r: Running) {
    let mut threads = Vec::new();
    tell_to_stop(r, &mut threads);
    for thread in threads {
        let _ = thread.join();
    }
}

/// Send a command to a runner, counted for its interrupt first (the runner uncounts it when
/// it takes it); `Err` when the runner is gone.
fn deliver(commands: &mpsc::UnboundedSender<Command>, interrupt: &Interrupt, command: Command) -> Result<(), ()> {
    let query = matches!(command, Command::Query { .. });
    interrupt.request(query);
    commands.send(command).map_err(|_| interrupt.taken(query))
}

/// Send `Stop` to a runner (and its shadow's), collecting the threads to wait for.
fn tell_to_stop(r: Running, threads: &mut Vec<std::thread::JoinHandle<()>>) {
    if let Some(shadow) = r.shadow {
        tell_to_stop(shadow.running, threads);
    }
    let _ = deliver(&r.commands, &r.interrupt, Command::Stop);
    r.cancel.cancel();
    threads.extend(r.thread);
}
