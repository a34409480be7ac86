//! The WebAssembly runtime: one wasmtime engine with its epoch ticker, and loading plugin
//! components against the `owlery:plugin` world.
//!
//! - `cache`: compiled components by content hash;
//! - `instance`: one live plugin instance, its limits, and the one path a call takes;
//! - `imports`: the host functions plugins call, one module per capability, reaching plugin
//!   state through the `StateView` trait (the runtime never sees the store behind it);
//! - `capabilities`: what a plugin's manifest grants it;
//! - `bindings`: the generated bindings of the world.

mod bindings;
mod cache;
mod capabilities;
mod imports;
mod instance;
mod limits;

use std::path::Path;
use std::time::Duration;

use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

pub use crate::effects::Effects;
pub use bindings::{GuestEnvelope, HandleError};
pub use cache::CacheError;
pub use capabilities::Capabilities;
pub use imports::{StateError, StateView};
pub use instance::{CallError, Instance, InstanceContext, Interrupt};
pub use limits::{CallLimits, LimitHit};

use cache::ComponentCache;
use imports::HostState;

/// The contract this host speaks: the package of `wit/owlery.wit` (the SDKs carry copies).
pub const CONTRACT: &str = "owlery:plugin@0.2.1";

/// How often the engine's epoch advances: the resolution of every plugin deadline.
const EPOCH_TICK: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("engine: {0:#}")]
    Engine(wasmtime::Error),
    #[error("engine: starting a thread: {0}")]
    Ticker(std::io::Error),
    #[error("not a valid component: {0:#}")]
    Compile(wasmtime::Error),
    #[error("compiling took longer than {0:?} (compile_timeout_ms)")]
    CompileTimeout(Duration),
    #[error("does not implement the owlery:plugin world: {0:#}")]
    World(wasmtime::Error),
    #[error(
        "built for the plugin contract owlery:plugin@{found}, but this host speaks {CONTRACT}: \
         rebuild it with the SDK for {CONTRACT} (`owlery plugin new` writes one)"
    )]
    Contract { found: String },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("the wasm runtime must be made inside a tokio runtime")]
    NoTokio,
}

/// The engine and the linker shared by every plugin.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cache: ComponentCache,
    /// The host's tokio runtime: guest calls are futures, driven on the calling thread.
    tokio: tokio::runtime::Handle,
    /// How long compiling one component may take.
    compile_timeout: Duration,
}

/// A compiled, linked component, ready to instantiate cheaply (~15 µs).
#[derive(Clone)]
pub struct LoadedComponent {
    pub hash: String,
    pre: bindings::PluginPre<HostState>,
}

impl Runtime {
    /// Build the engine (epoch interruption on) and start its epoch ticker. Compiled
    /// components are cached in `cache_dir` by the SHA-256 of their bytes. Call it inside
    /// the host's tokio runtime. Compiling one component may take `compile_timeout`.
    pub fn new(cache_dir: &Path, compile_timeout: Duration) -> Result<Runtime, RuntimeError> {
        let tokio = tokio::runtime::Handle::try_current().map_err(|_| RuntimeError::NoTokio)?;
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let engine = Engine::new(&config).map_err(RuntimeError::Engine)?;
        start_epoch_ticker(&engine)?;
        let mut linker = Linker::new(&engine);
        // Guests that touch std I/O import wasi:cli and friends; link them all (the context
        // grants nothing).
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(RuntimeError::Engine)?;
        bindings::Plugin::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)
            .map_err(RuntimeError::Engine)?;
        let cache = ComponentCache::open(cache_dir)?;
        Ok(Runtime { engine, linker, cache, tokio, compile_timeout })
    }

    /// Compile (or fetch from the cache), link and type-check a component against the world.
    pub fn load(&self, wasm: &[u8]) -> Result<LoadedComponent, RuntimeError> {
        let (hash, component) = self.compile(wasm)?;
        check_contract(&self.engine, &component)?;
        let pre = self.linker.instantiate_pre(&component).map_err(RuntimeError::World)?;
        let pre = bindings::PluginPre::new(pre).map_err(RuntimeError::World)?;
        Ok(LoadedComponent { hash, pre })
    }

    /// Compile (or fetch from the cache) on a thread of its own, waiting at most
    /// `compile_timeout`: compiling cannot be cancelled, but no caller waits past it (the
    /// thread finishes on its own and its result is dropped, or cached for next time).
    fn compile(&self, wasm: &[u8]) -> Result<(String, Component), RuntimeError> {
        let (done, result) = std::sync::mpsc::channel();
        let (engine, cache, wasm) = (self.engine.clone(), self.cache.clone(), wasm.to_vec());
        std::thread::Builder::new()
            .name("owlery-compile".into())
            .spawn(move || {
                let _ = done.send(cache.get_or_compile(&engine, &wasm));
            })
            .map_err(RuntimeError::Ticker)?;
        match result.recv_timeout(self.compile_timeout) {
            Ok(compiled) => compiled.map_err(RuntimeError::Compile),
            Err(_) => Err(RuntimeError::CompileTimeout(self.compile_timeout)),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn tokio(&self) -> &tokio::runtime::Handle {
        &self.tokio
    }
}

/// A component that imports the contract's interfaces at another version was built with
/// another SDK: say so, with both versions, rather than the linker's "no matching
/// implementation". Versions 0.x.y and 0.x.z are the same contract (semver, as wasmtime's
/// linker matches them). A component that imports none of them is judged by the world.
fn check_contract(engine: &Engine, component: &Component) -> Result<(), RuntimeError> {
    let ours = CONTRACT.rsplit_once('@').map_or("", |(_, v)| v);
    let line = |version: &str| {
        let mut parts = version.split('.');
        match (parts.next(), parts.next()) {
            (Some("0"), minor) => format!("0.{}", minor.unwrap_or("")),
            (major, _) => major.unwrap_or("").to_owned(),
        }
    };
    for (name, _) in component.component_type().imports(engine) {
        let Some(interface) = name.strip_prefix("owlery:plugin/") else { continue };
        let found = interface.split_once('@').map_or("(no version)", |(_, v)| v);
        if line(found) != line(ours) {
            return Err(RuntimeError::Contract { found: found.to_owned() });
        }
    }
    Ok(())
}

/// Advance the engine's epoch every `EPOCH_TICK` for as long as the engine lives (the
/// thread holds it weakly, so dropping the runtime ends the thread).
fn start_epoch_ticker(engine: &Engine) -> Result<(), RuntimeError> {
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
        .map(drop)
        .map_err(RuntimeError::Ticker)
}
