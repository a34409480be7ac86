//! What one plugin instance may take from the host, and the accounting that enforces it:
//! linear memory (all its memories together) and table elements through wasmtime's
//! `ResourceLimiter`; the bytes one call may buffer for the host to commit (state writes,
//! broadcasts, publishes); the size of one state key and value; and the log lines one call
//! may write (the excess is dropped and counted, not fatal).
//!
//! The guest's memory cap alone does not bound the host: what host functions copy out of
//! the guest lives in host memory until the batch is committed, so that is capped too.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Table elements one instance may have in all its tables (function references: a few
/// thousand in real plugins).
const TABLE_ELEMENTS: usize = 100_000;
/// Instances, tables and memories one component may create (a component is a few core
/// instances; memory is capped in total, whatever the count).
const INSTANCES: usize = 32;
const TABLES: usize = 32;
const MEMORIES: usize = 8;

/// The manifest's per-call limits (`[limits]`), in bytes.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    /// Linear memory, all memories of the instance together (`memory_mb`).
    pub memory: usize,
    /// State writes (key + value), broadcasts (room + payload) and publishes (type + data)
    /// one call may buffer together (`output_bytes_per_batch`).
    pub output: usize,
    /// One state value (`max_state_value_bytes`).
    pub state_value: usize,
    /// One state key (`max_state_key_bytes`).
    pub state_key: usize,
    /// Log lines and stdout/stderr of one call (`log_bytes_per_batch`).
    pub log: usize,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits { memory: 64 << 20, output: 8 << 20, state_value: 1 << 20, state_key: 1024, log: 64 << 10 }
    }
}

/// A limit a call ran into; it ends the call (the instance is discarded, the batch retried
/// and its event dead-lettered like any failure). `key` is the manifest key that sets it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("limit: {message} (limits.{key})")]
pub struct LimitHit {
    pub key: &'static str,
    pub message: String,
}

impl LimitHit {
    pub(crate) fn new(key: &'static str, message: String) -> LimitHit {
        LimitHit { key, message }
    }
}

/// Memory and table caps, as wasmtime's resource limiter. A grow past them traps with a
/// `LimitHit` (rather than returning -1), so a runaway plugin fails loudly; at
/// instantiation, a component that asks for more memory than its cap is refused.
pub(crate) struct ResourceCaps {
    memory_cap: usize,
    /// Bytes of all the instance's memories.
    memory_used: usize,
    table_elements: usize,
}

impl ResourceCaps {
    pub(crate) fn new(memory_cap: usize) -> ResourceCaps {
        ResourceCaps { memory_cap, memory_used: 0, table_elements: 0 }
    }
}

impl wasmtime::ResourceLimiter for ResourceCaps {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.memory_used - current.min(self.memory_used) + desired;
        if total > self.memory_cap {
            let what = if current == 0 { "asks for" } else { "grows to" };
            return Err(LimitHit::new(
                "memory_mb",
                format!("linear memory {what} {} MiB, over its cap of {} MiB", total >> 20, self.memory_cap >> 20),
            )
            .into());
        }
        self.memory_used = total;
        Ok(true)
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.table_elements - current.min(self.table_elements) + desired;
        if total > TABLE_ELEMENTS {
            return Err(LimitHit::new(
                "memory_mb",
                format!("tables grow to {total} elements, over the host's cap of {TABLE_ELEMENTS}"),
            )
            .into());
        }
        self.table_elements = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        INSTANCES
    }

    fn tables(&self) -> usize {
        TABLES
    }

    fn memories(&self) -> usize {
        MEMORIES
    }
}

/// The bytes one call has buffered for the host, against `output_bytes_per_batch`.
#[derive(Debug, Default)]
pub(crate) struct OutputBudget {
    used: usize,
}

impl OutputBudget {
    pub(crate) fn reset(&mut self) {
        self.used = 0;
    }

    /// Count `bytes` more of `what`, or refuse if that passes the cap.
    pub(crate) fn take(&mut self, limits: &CallLimits, bytes: usize, what: &str) -> Result<(), LimitHit> {
        let total = self.used.saturating_add(bytes);
        if total > limits.output {
            return Err(LimitHit::new(
                "output_bytes_per_batch",
                format!("{what} takes this call's output to {total} bytes, over {}", limits.output),
            ));
        }
        self.used = total;
        Ok(())
    }
}

/// Refuse a state key or value over its cap.
pub(crate) fn check_state_entry(limits: &CallLimits, key: &str, value: Option<&[u8]>) -> Result<(), LimitHit> {
    if key.len() > limits.state_key {
        return Err(LimitHit::new(
            "max_state_key_bytes",
            format!("a state key of {} bytes, over {}", key.len(), limits.state_key),
        ));
    }
    match value {
        Some(value) if value.len() > limits.state_value => Err(LimitHit::new(
            "max_state_value_bytes",
            format!("a state value of {} bytes under key {:?}, over {}", value.len(), short(key), limits.state_value),
        )),
        _ => Ok(()),
    }
}

fn short(key: &str) -> &str {
    key.char_indices().nth(64).map_or(key, |(at, _)| &key[..at])
}

/// The log bytes one call may write: shared by the `log` import and the guest's
/// stdout/stderr streams, reset at each call. What passes the cap is dropped and counted,
/// with one warning per call.
#[derive(Debug, Default)]
pub(crate) struct LogBudget {
    cap: AtomicU64,
    used: AtomicU64,
    warned: AtomicBool,
    /// Bytes dropped over the instance's life.
    dropped: AtomicU64,
}

impl LogBudget {
    pub(crate) fn new(cap: usize) -> Arc<LogBudget> {
        let budget = LogBudget::default();
        budget.cap.store(cap as u64, Ordering::Relaxed);
        Arc::new(budget)
    }

    pub(crate) fn reset(&self) {
        self.used.store(0, Ordering::Relaxed);
        self.warned.store(false, Ordering::Relaxed);
    }

    /// Whether `bytes` more may be written by `plugin` in this call; if not, they are
    /// counted as dropped (and the first drop of the call is logged).
    pub(crate) fn admit(&self, plugin: &str, bytes: usize) -> bool {
        let bytes = bytes as u64;
        let cap = self.cap.load(Ordering::Relaxed);
        let used = self.used.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if used <= cap {
            return true;
        }
        self.dropped.fetch_add(bytes, Ordering::Relaxed);
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                plugin,
                cap,
                "plugin log output over limits.log_bytes_per_batch; dropping the rest of this call's"
            );
        }
        false
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use wasmtime::ResourceLimiter;

    use super::*;

    #[test]
    fn memory_is_capped_across_all_memories_and_at_creation() {
        let mut caps = ResourceCaps::new(10 << 20);
        assert!(caps.memory_growing(0, 4 << 20, None).unwrap());
        assert!(caps.memory_growing(0, 4 << 20, None).unwrap(), "a second memory: 8 MiB in all");
        let error = caps.memory_growing(4 << 20, 7 << 20, None).unwrap_err();
        assert_eq!(error.downcast_ref::<LimitHit>().unwrap().key, "memory_mb", "{error}");
        let mut fresh = ResourceCaps::new(10 << 20);
        let error = fresh.memory_growing(0, 256 << 20, None).unwrap_err().to_string();
        assert!(error.contains("asks for 256 MiB"), "{error}");
    }

    #[test]
    fn tables_are_capped() {
        let mut caps = ResourceCaps::new(1 << 20);
        assert!(caps.table_growing(0, 1000, None).unwrap());
        assert!(caps.table_growing(1000, TABLE_ELEMENTS + 1, None).is_err());
    }

    #[test]
    fn output_state_and_log_budgets_refuse_past_their_caps() {
        let limits = CallLimits { output: 100, state_value: 10, state_key: 4, log: 8, ..CallLimits::default() };
        let mut output = OutputBudget::default();
        output.take(&limits, 60, "a state write").unwrap();
        assert_eq!(output.take(&limits, 41, "a broadcast").unwrap_err().key, "output_bytes_per_batch");
        output.reset();
        output.take(&limits, 100, "a publish").unwrap();

        assert_eq!(check_state_entry(&limits, "toolong", None).unwrap_err().key, "max_state_key_bytes");
        assert_eq!(check_state_entry(&limits, "k", Some(&[0; 11])).unwrap_err().key, "max_state_value_bytes");
        check_state_entry(&limits, "k", Some(&[0; 10])).unwrap();

        let log = LogBudget::new(limits.log);
        assert!(log.admit("p", 8));
        assert!(!log.admit("p", 1));
        assert_eq!(log.dropped(), 1);
        log.reset();
        assert!(log.admit("p", 8), "each call has its own budget");
    }
}
