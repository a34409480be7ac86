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

use std::path::Path;
use std::time::Duration;

use wasmtime::Engine;
use wasmtime::component::Linker;

pub use crate::effects::Effects;
pub use bindings::{GuestEnvelope, HandleError};
pub use cache::CacheError;
pub use capabilities::Capabilities;
pub use imports::{StateError, StateView};
pub use instance::{CallError, Instance, InstanceContext};

use cache::ComponentCache;
use imports::HostState;

/// How often the engine's epoch advances: the resolution of every plugin deadline.
const EPOCH_TICK: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("engine: {0:#}")]
    Engine(wasmtime::Error),
    #[error("engine: epoch ticker: {0}")]
    Ticker(std::io::Error),
    #[error("not a valid component: {0:#}")]
    Compile(wasmtime::Error),
    #[error("does not implement the owlery:plugin world: {0:#}")]
    World(wasmtime::Error),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// The engine and the linker shared by every plugin.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cache: ComponentCache,
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
        let engine = Engine::new(&config).map_err(RuntimeError::Engine)?;
        start_epoch_ticker(&engine)?;
        let mut linker = Linker::new(&engine);
        // Guests that touch std I/O import wasi:cli and friends; link them all (the context
        // grants nothing).
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(RuntimeError::Engine)?;
        bindings::Plugin::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)
            .map_err(RuntimeError::Engine)?;
        let cache = ComponentCache::open(cache_dir)?;
        Ok(Runtime { engine, linker, cache })
    }

    /// Compile (or fetch from the cache), link and type-check a component against the world.
    pub fn load(&self, wasm: &[u8]) -> Result<LoadedComponent, RuntimeError> {
        let (hash, component) = self.cache.get_or_compile(&self.engine, wasm).map_err(RuntimeError::Compile)?;
        let pre = self.linker.instantiate_pre(&component).map_err(RuntimeError::World)?;
        let pre = bindings::PluginPre::new(pre).map_err(RuntimeError::World)?;
        Ok(LoadedComponent { hash, pre })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
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
