//! One live plugin instance: its own wasmtime store, the limits it runs under (memory and
//! table caps, an epoch deadline per call) and the one path every call into the guest takes.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Store, StoreLimits, StoreLimitsBuilder};

use super::bindings::{self, GuestEnvelope, HandleError};
use super::capabilities::Capabilities;
use super::imports::{Call, HostState, StateView};
use super::{EPOCH_TICK, LoadedComponent, Runtime};
use crate::effects::Effects;
use crate::envelope::Routing;

/// Everything an instance needs from the host.
#[derive(Clone)]
pub struct InstanceContext {
    /// The plugin's name: in logs and in the ids of what it publishes.
    pub plugin: Arc<str>,
    /// Whose state it reads: the plugin's name, or a shadow's own key space.
    pub namespace: Arc<str>,
    pub caps: Arc<Capabilities>,
    /// Committed plugin state (the host's store).
    pub store: Arc<dyn StateView>,
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

impl CallError {
    fn trap(e: &wasmtime::Error) -> CallError {
        tracing::debug!(error = %format!("{e:?}"), "plugin call failed");
        CallError::Trap(match e.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => "timed out (epoch deadline reached)".to_owned(),
            Some(trap) => format!("trapped: {trap}"),
            None => e.root_cause().to_string(),
        })
    }

    fn failed(message: String) -> CallError {
        CallError::Failed { index: None, message }
    }
}

/// One live instance of a plugin with its own store.
pub struct Instance {
    store: Store<HostState>,
    plugin: bindings::Plugin,
}

/// The caps every instance runs under; the memory cap is the manifest's. A grow past them
/// traps rather than returning -1, so a runaway plugin fails loudly.
fn limits(memory_bytes: usize) -> StoreLimits {
    StoreLimitsBuilder::new()
        .memory_size(memory_bytes)
        .trap_on_grow_failure(true)
        .instances(16)
        .tables(32)
        .memories(4)
        .build()
}

impl LoadedComponent {
    pub fn instantiate(&self, runtime: &Runtime, cx: &InstanceContext) -> Result<Instance, CallError> {
        let state = HostState::new(cx, limits(cx.caps.memory_bytes));
        let mut store = Store::new(runtime.engine(), state);
        store.limiter(|s| &mut s.limits);
        // Instantiation runs guest code too; give it a generous fixed deadline (each call
        // then sets its own).
        store.set_epoch_deadline(1_000);
        store.epoch_deadline_trap();
        let plugin = self.pre.instantiate(&mut store).map_err(|e| CallError::trap(&e))?;
        Ok(Instance { store, plugin })
    }
}

/// A wall-clock timeout as epoch ticks: rounded down to whole ticks, at least one, plus one
/// because the current tick may be about to end.
fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
}

impl Instance {
    pub fn init(&mut self, config_json: &str, timeout: Duration) -> Result<(), CallError> {
        let (result, _) = self.call(Call::ReadOnly, timeout, |plugin, store| plugin.call_init(store, config_json))?;
        result.map_err(CallError::failed)
    }

    /// Call `handle`; on success the buffered effects are returned for the runner to commit.
    pub fn handle(&mut self, batch: &Arc<[GuestEnvelope]>, timeout: Duration) -> Result<Effects, CallError> {
        let (result, effects) =
            self.call(Call::Handle(batch), timeout, |plugin, store| plugin.call_handle(store, batch))?;
        result.map(|()| effects).map_err(|HandleError { index, message }| CallError::Failed { index, message })
    }

    pub fn query(&mut self, request_json: &str, timeout: Duration) -> Result<String, CallError> {
        let (result, _) = self.call(Call::ReadOnly, timeout, |plugin, store| plugin.call_query(store, request_json))?;
        result.map_err(CallError::failed)
    }

    /// The one way into the guest: set the call's deadline and what the imports may do, run
    /// `guest`, and collect what it buffered (whatever the outcome: effects are returned only
    /// with the guest's answer, and dropped by the caller otherwise). Making calls
    /// cancellable later changes this function only.
    fn call<R>(
        &mut self,
        call: Call<'_>,
        timeout: Duration,
        guest: impl FnOnce(&bindings::Plugin, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<(R, Effects), CallError> {
        self.store.data_mut().begin(call);
        self.store.set_epoch_deadline(deadline_ticks(timeout));
        let result = guest(&self.plugin, &mut self.store);
        let effects = self.store.data_mut().finish();
        result.map(|answer| (answer, effects)).map_err(|e| CallError::trap(&e))
    }
}
