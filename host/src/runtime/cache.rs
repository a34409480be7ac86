//! Compiled components cached on disk by the SHA-256 of their bytes, so a restart or a
//! reload of the same plugin skips compilation.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Why the cache directory could not be used.
#[derive(Debug, thiserror::Error)]
#[error("component cache {path}: {source}")]
pub struct CacheError {
    path: PathBuf,
    source: std::io::Error,
}

/// A directory of `<sha256>.cwasm` files written by `Component::serialize`.
#[derive(Clone)]
pub(super) struct ComponentCache {
    dir: PathBuf,
}

impl ComponentCache {
    pub(super) fn open(dir: &Path) -> Result<ComponentCache, CacheError> {
        std::fs::create_dir_all(dir).map_err(|source| CacheError { path: dir.to_owned(), source })?;
        Ok(ComponentCache { dir: dir.to_owned() })
    }

    /// The component for `wasm` and its content hash: from the cache, or compiled (and then
    /// cached; failing to cache only costs a later compile, so it is logged, not returned).
    pub(super) fn get_or_compile(&self, engine: &Engine, wasm: &[u8]) -> wasmtime::Result<(String, Component)> {
        let hash = format!("{:x}", Sha256::digest(wasm));
        let cached = self.dir.join(format!("{hash}.cwasm"));
        if let Some(component) = deserialize(engine, &cached) {
            return Ok((hash, component));
        }
        let component = Component::new(engine, wasm)?;
        if let Ok(bytes) = component.serialize() {
            // Written aside and renamed, so a reader never sees half a file; the temp file
            // is this write's own, since two compiles of one component can run at once (two
            // hosts sharing a data directory, an upload racing the watcher). Both then
            // rename the same bytes into place.
            if let Err(error) = crate::plugins::write_atomically(&cached, &bytes) {
                tracing::warn!(path = %cached.display(), %error, "could not cache a compiled component");
            }
        }
        Ok((hash, component))
    }
}

#[allow(unsafe_code)]
fn deserialize(engine: &Engine, path: &Path) -> Option<Component> {
    if !path.exists() {
        return None;
    }
    // SAFETY: files in the cache directory are written only by `get_or_compile` above, from
    // `Component::serialize` of an engine; wasmtime rejects (with an error, handled by
    // recompiling) an artifact made by an incompatible engine or version.
    match unsafe { Component::deserialize_file(engine, path) } {
        Ok(component) => Some(component),
        Err(error) => {
            tracing::info!(path = %path.display(), error = %format!("{error:#}"), "recompiling a stale cached component");
            None
        }
    }
}
