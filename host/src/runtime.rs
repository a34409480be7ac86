//! The WebAssembly runtime: one wasmtime engine, the plugin world's bindings, the host
//! functions plugins may call, and per-instance limits (memory cap, epoch deadline, a WASI
//! context that grants nothing but stdout/stderr, which go to tracing).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::envelope::{Envelope, Pattern, Routing, check_event_type};
use crate::log::AppendItem;
use crate::store::{Broadcast, Store as HostStore};

/// All generated bindings of the `owlery:plugin` world.
pub mod bindings {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../wit",
        imports: { default: trappable },
    });
}

pub use bindings::owlery::plugin::types::{Envelope as GuestEnvelope, HandleError};
use bindings::owlery::plugin::{host, types};

/// How often the engine's epoch advances: the resolution of every plugin deadline.
const EPOCH_TICK: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("engine: {0}")]
    Engine(String),
    #[error("not a valid component: {0:#}")]
    Compile(wasmtime::Error),
    #[error("does not implement the owlery:plugin world: {0:#}")]
    World(wasmtime::Error),
    #[error("component cache {path}: {error}")]
    Cache { path: PathBuf, error: std::io::Error },
}

/// The engine and the linker shared by every plugin.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: PathBuf,
}

/// A compiled, linked component, ready to instantiate cheaply (~15 µs).
#[derive(Clone)]
pub struct LoadedComponent {
    pub hash: String,
    pre: bindings::PluginPre<HostState>,
}

impl Runtime {
    /// Build the engine (epoch interruption on) and start its epoch ticker. Compiled
    /// components are cached in `cache_dir` by the SHA-256 of their bytes.
    pub fn new(cache_dir: &Path) -> Result<Runtime, RuntimeError> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let engine = Engine::new(&config).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("owlery-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| RuntimeError::Engine(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        // Guests that touch std I/O import wasi:cli and friends; link them all (the context
        // grants nothing).
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        bindings::Plugin::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        std::fs::create_dir_all(cache_dir)
            .map_err(|error| RuntimeError::Cache { path: cache_dir.to_owned(), error })?;
        Ok(Runtime { engine, linker, cache_dir: cache_dir.to_owned() })
    }

    /// Compile (or fetch from the cache), link and type-check a component against the world.
    pub fn load(&self, wasm: &[u8]) -> Result<LoadedComponent, RuntimeError> {
        let hash = format!("{:x}", Sha256::digest(wasm));
        let cached = self.cache_dir.join(format!("{hash}.cwasm"));
        let component = match self.deserialize_cached(&cached) {
            Some(component) => component,
            None => {
                let component = Component::new(&self.engine, wasm).map_err(RuntimeError::Compile)?;
                if let Ok(bytes) = component.serialize() {
                    let tmp = cached.with_extension("tmp");
                    if let Err(error) = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &cached)) {
                        tracing::warn!(path = %cached.display(), %error, "could not cache a compiled component");
                    }
                }
                component
            }
        };
        let pre = self.linker.instantiate_pre(&component).map_err(RuntimeError::World)?;
        let pre = bindings::PluginPre::new(pre).map_err(RuntimeError::World)?;
        Ok(LoadedComponent { hash, pre })
    }

    #[allow(unsafe_code)]
    fn deserialize_cached(&self, path: &Path) -> Option<Component> {
        if !path.exists() {
            return None;
        }
        // SAFETY: files in the cache directory are written only by `load` above, from
        // `Component::serialize` of an engine; wasmtime rejects (with an error, handled by
        // recompiling) an artifact made by an incompatible engine or version.
        match unsafe { Component::deserialize_file(&self.engine, path) } {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::info!(path = %path.display(), error = %format!("{error:#}"), "recompiling a stale cached component");
                None
            }
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// What a plugin may do, from its manifest. A plugin can never grant itself anything.
#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    pub broadcast: bool,
    pub publish: Vec<Pattern>,
    pub state: bool,
    pub memory_bytes: usize,
}

/// The buffered effects of one call; applied by the runner only if the call succeeded.
#[derive(Debug, Default)]
pub struct Effects {
    pub state_writes: BTreeMap<String, Option<Vec<u8>>>,
    pub broadcasts: Vec<Broadcast>,
    pub publishes: Vec<AppendItem>,
}

/// An event of the batch being handled, as a `cause` of publishes and broadcasts.
struct Cause {
    timestamp: String,
    /// Events published for it so far.
    published: u32,
    /// Broadcasts made for it so far.
    broadcast: u32,
}

/// The per-instance data wasmtime hands to host functions.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    plugin: Arc<str>,
    namespace: Arc<str>,
    caps: Arc<Capabilities>,
    store: Arc<HostStore>,
    routing: Arc<Routing>,
    effects: Effects,
    /// The batch being handled.
    batch: Arc<[GuestEnvelope]>,
    /// eventId → what was published and broadcast for it, for the batch being handled;
    /// made on the first publish or broadcast (most batches of most plugins make none).
    causes: HashMap<String, Cause>,
    /// true while serving `query`: nothing may be written
    read_only: bool,
}

/// What a plugin made because of an event of its batch.
#[derive(Clone, Copy)]
enum Effect {
    Publish,
    Broadcast,
}

impl HostState {
    /// The id of the next publish or broadcast caused by event `cause`, derived from the
    /// plugin, the cause and how many of that kind it already made (stable whatever the
    /// batch boundaries); and the cause's timestamp.
    fn derive_id(&mut self, cause: &str, effect: Effect) -> Result<(uuid::Uuid, String), String> {
        let plugin = self.plugin.clone();
        let Some(counts) = self.cause(cause) else {
            return Err(format!("cause {cause:?} is not an event of the current batch"));
        };
        let (name, count) = match effect {
            Effect::Publish => (format!("owlery/{plugin}/{cause}/{}", counts.published), &mut counts.published),
            Effect::Broadcast => {
                (format!("owlery/{plugin}/{cause}/broadcast/{}", counts.broadcast), &mut counts.broadcast)
            }
        };
        *count += 1;
        Ok((uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()), counts.timestamp.clone()))
    }

    /// What was published and broadcast so far for the event `id` of the current batch.
    fn cause(&mut self, id: &str) -> Option<&mut Cause> {
        if self.causes.is_empty() {
            self.causes = self
                .batch
                .iter()
                .map(|e| (e.event_id.clone(), Cause { timestamp: e.timestamp.clone(), published: 0, broadcast: 0 }))
                .collect();
        }
        self.causes.get_mut(id)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Everything an instance needs from the host.
#[derive(Clone)]
pub struct InstanceContext {
    /// The plugin's name: in logs and in the ids of what it publishes.
    pub plugin: Arc<str>,
    /// Whose state it reads: the plugin's name, or a shadow's own key space.
    pub namespace: Arc<str>,
    pub caps: Arc<Capabilities>,
    pub store: Arc<HostStore>,
    pub routing: Arc<Routing>,
}

/// Why a call into a plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The guest trapped, ran out of time or memory, or a host function refused it; the
    /// instance must be discarded.
    #[error("{0}")]
    Trap(String),
    /// The guest returned an error; `index` names the failing event when it said.
    #[error("{message}")]
    Failed { index: Option<u32>, message: String },
}

/// One live instance of a plugin with its own store.
pub struct Instance {
    store: Store<HostState>,
    plugin: bindings::Plugin,
}

fn trap_message(e: &wasmtime::Error) -> String {
    tracing::debug!(error = %format!("{e:?}"), "plugin call failed");
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => "timed out (epoch deadline reached)".to_owned(),
        Some(trap) => format!("trapped: {trap}"),
        None => e.root_cause().to_string(),
    }
}

impl LoadedComponent {
    pub fn instantiate(&self, runtime: &Runtime, cx: &InstanceContext) -> Result<Instance, CallError> {
        let wasi = WasiCtxBuilder::new()
            .stdout(GuestOutput { plugin: cx.plugin.clone(), stream: "stdout" })
            .stderr(GuestOutput { plugin: cx.plugin.clone(), stream: "stderr" })
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(cx.caps.memory_bytes)
            .trap_on_grow_failure(true)
            .instances(16)
            .tables(32)
            .memories(4)
            .build();
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            limits,
            plugin: cx.plugin.clone(),
            namespace: cx.namespace.clone(),
            caps: cx.caps.clone(),
            store: cx.store.clone(),
            routing: cx.routing.clone(),
            effects: Effects::default(),
            batch: Arc::new([]),
            causes: HashMap::new(),
            read_only: false,
        };
        let mut store = Store::new(runtime.engine(), state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(1_000);
        store.epoch_deadline_trap();
        let plugin = self.pre.instantiate(&mut store).map_err(|e| CallError::Trap(trap_message(&e)))?;
        Ok(Instance { store, plugin })
    }
}

fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
}

impl Instance {
    pub fn init(&mut self, config_json: &str, timeout: Duration) -> Result<(), CallError> {
        self.store.set_epoch_deadline(deadline_ticks(timeout));
        self.store.data_mut().read_only = true;
        let result = self.plugin.call_init(&mut self.store, config_json);
        self.store.data_mut().read_only = false;
        self.store.data_mut().effects = Effects::default();
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(CallError::Failed { index: None, message }),
            Err(e) => Err(CallError::Trap(trap_message(&e))),
        }
    }

    /// Call `handle`; on success the buffered effects are returned for the runner to commit.
    pub fn handle(&mut self, batch: &Arc<[GuestEnvelope]>, timeout: Duration) -> Result<Effects, CallError> {
        let data = self.store.data_mut();
        data.effects = Effects::default();
        data.batch = batch.clone();
        data.causes.clear();
        self.store.set_epoch_deadline(deadline_ticks(timeout));
        let result = self.plugin.call_handle(&mut self.store, batch);
        let data = self.store.data_mut();
        data.batch = Arc::new([]);
        let effects = std::mem::take(&mut data.effects);
        match result {
            Ok(Ok(())) => Ok(effects),
            Ok(Err(HandleError { index, message })) => Err(CallError::Failed { index, message }),
            Err(e) => Err(CallError::Trap(trap_message(&e))),
        }
    }

    pub fn query(&mut self, request_json: &str, timeout: Duration) -> Result<String, CallError> {
        self.store.set_epoch_deadline(deadline_ticks(timeout));
        self.store.data_mut().read_only = true;
        let result = self.plugin.call_query(&mut self.store, request_json);
        self.store.data_mut().read_only = false;
        self.store.data_mut().effects = Effects::default();
        match result {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(message)) => Err(CallError::Failed { index: None, message }),
            Err(e) => Err(CallError::Trap(trap_message(&e))),
        }
    }
}

fn refuse(message: String) -> wasmtime::Error {
    wasmtime::Error::msg(message)
}

impl HostState {
    fn need_state(&self) -> wasmtime::Result<()> {
        if !self.caps.state {
            return Err(refuse(format!("plugin {} has no `state` capability in its manifest", self.plugin)));
        }
        Ok(())
    }

    fn need_writable(&self, what: &str) -> wasmtime::Result<()> {
        if self.read_only {
            return Err(refuse(format!("{what} is not allowed outside `handle`")));
        }
        Ok(())
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn log(&mut self, level: types::LogLevel, message: String) -> wasmtime::Result<()> {
        let plugin = &*self.plugin;
        match level {
            types::LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            types::LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            types::LogLevel::Info => tracing::info!(plugin, "{message}"),
            types::LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            types::LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
        Ok(())
    }

    fn now(&mut self) -> wasmtime::Result<u64> {
        Ok(crate::envelope::now_millis())
    }

    fn state_get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        self.need_state()?;
        if let Some(value) = self.effects.state_writes.get(&key) {
            return Ok(value.clone());
        }
        Ok(self.store.state_get(&self.namespace, &key)?)
    }

    fn state_set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<()> {
        self.need_state()?;
        self.need_writable("state-set")?;
        self.effects.state_writes.insert(key, Some(value));
        Ok(())
    }

    fn state_delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.need_state()?;
        self.need_writable("state-delete")?;
        self.effects.state_writes.insert(key, None);
        Ok(())
    }

    fn state_scan(&mut self, prefix: String) -> wasmtime::Result<Vec<(String, Vec<u8>)>> {
        self.need_state()?;
        let mut merged: BTreeMap<String, Vec<u8>> =
            self.store.state_scan(&self.namespace, &prefix)?.into_iter().collect();
        for (key, value) in self.effects.state_writes.range(prefix.clone()..) {
            if !key.starts_with(&prefix) {
                break;
            }
            match value {
                Some(v) => merged.insert(key.clone(), v.clone()),
                None => merged.remove(key),
            };
        }
        Ok(merged.into_iter().collect())
    }

    fn broadcast(&mut self, cause: String, room: String, payload: String) -> wasmtime::Result<Result<(), String>> {
        self.need_writable("broadcast")?;
        if !self.caps.broadcast {
            return Ok(Err("this plugin has no `broadcast` capability in its manifest".into()));
        }
        if room.is_empty() || room.len() > 256 {
            return Ok(Err("room names are 1 to 256 characters".into()));
        }
        if serde_json::from_str::<serde::de::IgnoredAny>(&payload).is_err() {
            return Ok(Err("broadcast payload must be JSON".into()));
        }
        let (id, _) = match self.derive_id(&cause, Effect::Broadcast) {
            Ok(derived) => derived,
            Err(e) => return Ok(Err(e)),
        };
        self.effects.broadcasts.push(Broadcast { id, room, payload });
        Ok(Ok(()))
    }

    fn publish(&mut self, cause: String, event_type: String, data: String) -> wasmtime::Result<Result<(), String>> {
        self.need_writable("publish")?;
        if !self.caps.publish.iter().any(|p| p.matches(&event_type)) {
            return Ok(Err(format!("the manifest does not allow publishing {event_type:?}")));
        }
        if let Err(e) = check_event_type(&event_type) {
            return Ok(Err(format!("event type: {e}")));
        }
        let Ok(data) = serde_json::from_str::<serde_json::Value>(&data) else {
            return Ok(Err("publish data must be JSON".into()));
        };
        let (event_id, timestamp) = match self.derive_id(&cause, Effect::Publish) {
            Ok(derived) => derived,
            Err(e) => return Ok(Err(e)),
        };
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
        let topic = self.routing.topic_for(&envelope.event_type).to_owned();
        self.effects.publishes.push(AppendItem { topic, key: event_id.to_string(), envelope });
        Ok(Ok(()))
    }
}

/// Guest stdout/stderr, written to tracing line by line with the plugin's name.
#[derive(Clone)]
struct GuestOutput {
    plugin: Arc<str>,
    stream: &'static str,
}

impl GuestOutput {
    fn emit(&self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            tracing::info!(plugin = &*self.plugin, stream = self.stream, "{line}");
        }
    }
}

impl wasmtime_wasi::cli::IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl wasmtime_wasi::p2::OutputStream for GuestOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        self.emit(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.emit(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
