//! Watches the plugins directory: a new, changed or removed `NAME.wasm` or `NAME.toml` is
//! reconciled once the directory has been quiet for a moment (so a file being written is
//! not loaded half-way; writers should still write elsewhere and rename into place).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};

use super::Plugins;

/// Quiet time before changes are acted on.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// The plugin a changed path belongs to: `dir/NAME.wasm` or `dir/NAME.toml`, not hidden.
fn plugin_of(path: &Path) -> Option<String> {
    let ext = path.extension()?.to_str()?;
    if ext != "wasm" && ext != "toml" {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    if stem.starts_with('.') {
        return None;
    }
    Some(stem.to_owned())
}

/// Start watching; changes are applied until the returned watcher is dropped.
pub fn watch(plugins: Arc<Plugins>) -> notify::Result<notify::RecommendedWatcher> {
    let (tx, rx) = mpsc::channel::<String>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        // Reads (our own included) are access events: only changes matter.
        Ok(event) if matches!(event.kind, EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)) => {
            for name in event.paths.iter().filter_map(|p| plugin_of(p)) {
                let _ = tx.send(name);
            }
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "watching the plugins directory"),
    })?;
    watcher.watch(plugins.dir(), RecursiveMode::NonRecursive)?;
    std::thread::Builder::new()
        .name("owlery-plugin-watch".into())
        .spawn(move || {
            // Ends when the watcher (and with it the sender) is dropped.
            while let Ok(first) = rx.recv() {
                let mut names = BTreeSet::from([first]);
                while let Ok(more) = rx.recv_timeout(DEBOUNCE) {
                    names.insert(more);
                }
                for name in names {
                    if super::check_name(&name).is_ok() {
                        plugins.reconcile(&name);
                    }
                }
            }
        })
        .map_err(|e| notify::Error::generic(&e.to_string()))?;
    Ok(watcher)
}
