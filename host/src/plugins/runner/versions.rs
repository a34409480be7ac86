//! Changing what a runner runs, between two batches: swap in a new version keeping offsets
//! and state, or take over a shadow's version with its state and offsets.

use std::time::Duration;

use super::Runner;
use super::error::RunnerError;
use super::replay::Replay;
use crate::envelope::Pattern;
use crate::plugins::manifest::Manifest;
use crate::runtime::LoadedComponent;

/// The version a runner runs, with what it reads from the manifest on every batch.
pub(super) struct Version {
    pub component: LoadedComponent,
    pub manifest: Manifest,
    patterns: Vec<Pattern>,
    /// How long one `init` or `handle` call may take.
    pub timeout: Duration,
    /// How long one `query` call may take.
    pub query_timeout: Duration,
}

impl Version {
    pub fn new(component: LoadedComponent, manifest: Manifest) -> Self {
        let patterns = manifest.event_patterns();
        let timeout = Duration::from_millis(manifest.limits.batch_timeout_ms);
        let query_timeout = Duration::from_millis(manifest.limits.query_timeout_ms);
        Version { component, manifest, patterns, timeout, query_timeout }
    }

    /// Whether the plugin subscribed to events of this type.
    pub fn wants(&self, event_type: &str) -> bool {
        self.patterns.iter().any(|pattern| pattern.matches(event_type))
    }
}

impl Runner {
    /// Install a new version at this batch boundary; offsets and state stay. If the new
    /// version cannot start, the old one keeps running and the error is returned.
    pub(super) fn swap(&mut self, component: LoadedComponent, manifest: Manifest) -> Result<(), RunnerError> {
        let old = std::mem::replace(&mut self.version, Version::new(component, manifest));
        match self.new_instance() {
            Ok(instance) => self.instance = Some(instance),
            Err(e) => {
                self.version = old;
                self.instance = self.new_instance().ok();
                let error = RunnerError::NotStarted(e);
                self.status.update(|s| s.last_error = Some(error.to_string()));
                return Err(error);
            }
        }
        self.lifecycle.recover();
        self.dead_letter_streak = 0;
        self.reload_positions();
        tracing::info!(version = %&self.version.component.hash[..12], "new version swapped in");
        self.show_version();
        Ok(())
    }

    /// Become the shadow's version with the shadow's state and offsets. Events the old
    /// version already handled are not broadcast again.
    pub(super) fn promote(
        &mut self,
        shadow_namespace: &str,
        component: LoadedComponent,
        manifest: Manifest,
        version: &[u8],
    ) -> Result<(), RunnerError> {
        // What live had handled (a replay under way counts with its target): the promoted
        // state's catch-up up to there is kept quiet, in the promotion's own transaction, so
        // a crash right after it broadcasts nothing again.
        let handled = Replay::handled(self.lifecycle.any_replay(), &self.positions);
        let behind =
            self.deps.store.promote_namespace(shadow_namespace, &self.namespace, &handled.to_commit(), version)?;
        self.version = Version::new(component, manifest);
        self.instance = None;
        self.reload_positions();
        if let Some(behind) = behind {
            self.lifecycle.set_replay(Replay::from_stored(behind));
        }
        self.lifecycle.recover();
        self.dead_letter_streak = 0;
        let result = self.new_instance().map(|i| self.instance = Some(i)).map_err(RunnerError::PromotedNotStarted);
        tracing::info!(version = %&self.version.component.hash[..12], "shadow promoted");
        self.show_version();
        self.status.update(|s| s.replay = None);
        result
    }

    fn show_version(&self) {
        self.status.set_query_limits(&self.version.manifest.limits);
        let hash = self.version.component.hash.clone();
        self.status.update(|s| {
            s.version = hash;
            s.loaded_at = crate::envelope::now_rfc3339();
        });
    }
}
