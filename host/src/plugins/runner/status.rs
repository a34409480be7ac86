//! What a runner shows of itself: `PluginStatus` (the body of `GET /api/plugins`), shared
//! between the runner thread, which writes it, and the registry, which reads it; and the
//! metrics the runner keeps in it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::offsets::Offsets;
use crate::plugins::manifest::Limits;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Starting,
    Running,
    Paused,
    Replaying,
    Failed,
    Stopped,
}

/// How far a replay has come: records read since it started, of those it must read.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayProgress {
    pub done: u64,
    pub total: u64,
    pub started_at: String,
    pub finished_at: Option<String>,
}

/// What `GET /api/plugins` shows of a plugin.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginStatus {
    pub name: String,
    pub version: String,
    pub state: RunState,
    pub loaded_at: String,
    /// The next offset to read, per partition.
    pub offsets: Offsets,
    pub processed: u64,
    pub errors: u64,
    pub dead_letters: u64,
    pub last_error: Option<String>,
    /// Time spent inside the plugin, all batches.
    pub busy_micros: u64,
    pub batches: u64,
    pub avg_batch_micros: u64,
    pub events_per_second: f64,
    pub replay: Option<ReplayProgress>,
    /// How long processing stood still for the last version swap.
    pub last_swap_micros: Option<u64>,
    /// Versions swapped in while running.
    pub swaps: u64,
    /// Calls that ran into one of the manifest's limits (output, state sizes, memory).
    pub limit_hits: u64,
    /// Log bytes dropped past `log_bytes_per_batch`.
    pub log_bytes_dropped: u64,
    /// Where the last info line summing up batches left off: (when, processed, batches,
    /// busy micros), so that there is at most one a second per plugin.
    #[serde(skip)]
    summarised: Option<(Instant, u64, u64, u64)>,
}

impl PluginStatus {
    pub fn new(name: &str, version: &str) -> Self {
        PluginStatus {
            name: name.to_owned(),
            version: version.to_owned(),
            state: RunState::Starting,
            loaded_at: crate::envelope::now_rfc3339(),
            offsets: Offsets::default(),
            processed: 0,
            errors: 0,
            dead_letters: 0,
            last_error: None,
            busy_micros: 0,
            batches: 0,
            avg_batch_micros: 0,
            events_per_second: 0.0,
            replay: None,
            last_swap_micros: None,
            swaps: 0,
            summarised: None,
            limit_hits: 0,
            log_bytes_dropped: 0,
        }
    }
}

/// A plugin's status, written by its runner and read by the registry; and the gate its
/// queries wait behind.
#[derive(Clone)]
pub struct SharedStatus(Arc<Mutex<PluginStatus>>, Arc<QueryGate>);

/// Queries waiting for (or being answered by) a runner, at most `max` at once: a plugin
/// that answers slowly makes further queries fail fast instead of piling up.
#[derive(Debug, Default)]
pub struct QueryGate {
    waiting: AtomicUsize,
    max: AtomicUsize,
    /// `query_timeout_ms`: how long an asker waits for the answer, queueing included.
    timeout_ms: AtomicU64,
}

/// One query's place at the gate, given up when its asker is answered or gives up.
pub struct QuerySlot(Arc<QueryGate>);

impl Drop for QuerySlot {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SharedStatus {
    pub fn new(status: PluginStatus) -> Self {
        let gate = QueryGate {
            waiting: AtomicUsize::new(0),
            max: AtomicUsize::new(usize::MAX),
            timeout_ms: AtomicU64::new(u64::MAX),
        };
        SharedStatus(Arc::new(Mutex::new(status)), Arc::new(gate))
    }

    /// A place for one more query, or `None` when `max_queued_queries` are waiting.
    pub fn query_slot(&self) -> Option<QuerySlot> {
        let gate = &self.1;
        let max = gate.max.load(Ordering::Acquire);
        gate.waiting.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(QuerySlot(gate.clone()))
    }

    /// The version's `max_queued_queries` and `query_timeout_ms`.
    pub fn set_query_limits(&self, limits: &Limits) {
        self.1.max.store(limits.max_queued_queries, Ordering::Release);
        self.1.timeout_ms.store(limits.query_timeout_ms, Ordering::Release);
    }

    /// How long a query's asker waits for its answer, a batch in progress included.
    pub fn query_timeout(&self) -> Duration {
        Duration::from_millis(self.1.timeout_ms.load(Ordering::Acquire))
    }

    pub fn snapshot(&self) -> PluginStatus {
        self.lock().clone()
    }

    pub fn update<R>(&self, f: impl FnOnce(&mut PluginStatus) -> R) -> R {
        f(&mut self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PluginStatus> {
        self.0.lock().expect("status lock")
    }

    pub fn note_error(&self, message: impl Into<String>) {
        self.update(|s| {
            s.errors += 1;
            s.last_error = Some(message.into());
        });
    }

    /// One call of the plugin's `handle`, however it ended.
    pub fn note_call(&self, took: Duration) {
        let micros = took.as_micros() as u64;
        self.update(|s| {
            crate::metrics::metrics().batch_seconds.with_label_values(&[s.name.as_str()]).observe(took.as_secs_f64());
            s.busy_micros += micros;
            s.batches += 1;
            s.avg_batch_micros = s.busy_micros / s.batches;
            let (at, processed, batches, busy) = *s.summarised.get_or_insert((Instant::now(), 0, 0, 0));
            if at.elapsed() >= Duration::from_secs(1) {
                let done = s.batches.saturating_sub(batches);
                tracing::info!(
                    plugin = %s.name,
                    batches = done,
                    events = s.processed.saturating_sub(processed),
                    avg_batch_us = s.busy_micros.saturating_sub(busy) / done.max(1),
                    dead_letters = s.dead_letters,
                    over_ms = at.elapsed().as_millis() as u64,
                    "batches handled"
                );
                s.summarised = Some((Instant::now(), s.processed, s.batches, s.busy_micros));
            }
        });
    }
}

/// Events per second, measured over about a second at a time.
pub struct Rate {
    since: Instant,
    processed: u64,
}

impl Default for Rate {
    fn default() -> Self {
        Rate { since: Instant::now(), processed: 0 }
    }
}

impl Rate {
    /// Update `events_per_second` if a second has passed since the last update.
    pub fn tick(&mut self, status: &SharedStatus) {
        let elapsed = self.since.elapsed();
        if elapsed < Duration::from_secs(1) {
            return;
        }
        status.update(|s| {
            let rate = (s.processed - self.processed.min(s.processed)) as f64 / elapsed.as_secs_f64();
            self.since = Instant::now();
            self.processed = s.processed;
            s.events_per_second = (rate * 10.0).round() / 10.0;
        });
    }
}
