//! One live plugin instance: its own wasmtime store, the limits it runs under (memory and
//! table caps, an epoch deadline per call) and the one path every call into the guest takes.
//!
//! Calls are async underneath (wasmtime's async support, WASI linked async) and run on the
//! caller's thread under a wall-clock deadline: guest code yields to the host at every
//! epoch tick, and a guest blocked inside a host call (a WASI sleep or poll) is waiting on a
//! future; either way the call's future is dropped at its deadline or when the plugin is
//! stopped, as wasmtime's CLI and Spin do, and the instance is then discarded.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use wasmtime::Store;

use super::bindings::{self, GuestEnvelope, HandleError};
use super::capabilities::Capabilities;
use super::imports::{Call, HostState, StateView};
use super::limits::LimitHit;
use super::{LoadedComponent, Runtime};
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
    /// Cancelled when the plugin is stopped: a call in progress ends at once.
    pub cancel: CancellationToken,
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
    /// The call ran past its deadline (in guest code or blocked in a host call); the
    /// instance must be discarded.
    #[error("{0}")]
    Timeout(String),
    /// The guest ran into one of its manifest's limits; the instance must be discarded.
    #[error(transparent)]
    Limit(LimitHit),
    /// The plugin is being stopped; the call was abandoned (not the guest's fault: its
    /// events are not dead-lettered).
    #[error("the plugin is stopping")]
    Cancelled,
}

impl CallError {
    fn trap(e: &wasmtime::Error) -> CallError {
        tracing::debug!(error = %format!("{e:?}"), "plugin call failed");
        if let Some(hit) = e.downcast_ref::<LimitHit>() {
            return CallError::Limit(hit.clone());
        }
        match e.downcast_ref::<wasmtime::Trap>() {
            Some(trap) => CallError::Trap(format!("trapped: {trap}")),
            None => CallError::Trap(e.root_cause().to_string()),
        }
    }

    fn failed(message: String) -> CallError {
        CallError::Failed { index: None, message }
    }
}

/// One live instance of a plugin with its own store.
pub struct Instance {
    store: Store<HostState>,
    plugin: bindings::Plugin,
    /// Drives the calls' futures (on the calling thread) and their timers.
    tokio: tokio::runtime::Handle,
    cancel: CancellationToken,
}

/// Deadline of instantiation, which runs guest start-up code too (each call then sets its
/// own deadline).
const INSTANTIATE_TIMEOUT: Duration = Duration::from_secs(5);

impl LoadedComponent {
    /// A fresh instance. Must not be called from inside an async task (it blocks on the
    /// instantiation); runner threads and `spawn_blocking` are fine.
    pub fn instantiate(&self, runtime: &Runtime, cx: &InstanceContext) -> Result<Instance, CallError> {
        let mut store = Store::new(runtime.engine(), HostState::new(cx));
        store.limiter(|s| &mut s.resources);
        // Guest code yields to the host every epoch tick, so that the call's deadline and a
        // stop are noticed within a tick whatever the guest does.
        store.epoch_deadline_async_yield_and_update(1);
        let tokio = runtime.tokio().clone();
        let plugin = bounded(&tokio, &cx.cancel, INSTANTIATE_TIMEOUT, self.pre.instantiate_async(&mut store))?
            .map_err(|e| CallError::trap(&e))?;
        Ok(Instance { store, plugin, tokio, cancel: cx.cancel.clone() })
    }
}

/// Run `call` on this thread until it ends, `timeout` passes or `cancel` fires.
fn bounded<R>(
    tokio: &tokio::runtime::Handle,
    cancel: &CancellationToken,
    timeout: Duration,
    call: impl Future<Output = R>,
) -> Result<R, CallError> {
    tokio.block_on(async {
        tokio::select! {
            ended = tokio::time::timeout(timeout, call) => {
                ended.map_err(|_| CallError::Timeout(format!("timed out after {} ms", timeout.as_millis())))
            }
            _ = cancel.cancelled() => Err(CallError::Cancelled),
        }
    })
}

impl Instance {
    pub fn init(&mut self, config_json: &str, timeout: Duration) -> Result<(), CallError> {
        let (result, _) =
            self.call(Call::ReadOnly, timeout, async |plugin, store| plugin.call_init(store, config_json).await)?;
        result.map_err(CallError::failed)
    }

    /// Call `handle`; on success the buffered effects are returned for the runner to commit.
    pub fn handle(&mut self, batch: &Arc<[GuestEnvelope]>, timeout: Duration) -> Result<Effects, CallError> {
        let (result, effects) =
            self.call(Call::Handle(batch), timeout, async |plugin, store| plugin.call_handle(store, batch).await)?;
        result.map(|()| effects).map_err(|HandleError { index, message }| CallError::Failed { index, message })
    }

    pub fn query(&mut self, request_json: &str, timeout: Duration) -> Result<String, CallError> {
        let (result, _) =
            self.call(Call::ReadOnly, timeout, async |plugin, store| plugin.call_query(store, request_json).await)?;
        result.map_err(CallError::failed)
    }

    /// Log bytes dropped over this instance's life (past `log_bytes_per_batch`).
    pub fn log_dropped(&self) -> u64 {
        self.store.data().log.dropped()
    }

    /// The one way into the guest: set the call's deadline and what the imports may do, run
    /// `guest` on this thread until it answers or its deadline passes, and collect what it
    /// buffered (whatever the outcome: effects are returned only with the guest's answer,
    /// and dropped by the caller otherwise).
    fn call<R>(
        &mut self,
        call: Call<'_>,
        timeout: Duration,
        guest: impl AsyncFnOnce(&bindings::Plugin, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<(R, Effects), CallError> {
        self.store.data_mut().begin(call);
        let (plugin, store) = (&self.plugin, &mut self.store);
        let result = bounded(&self.tokio, &self.cancel, timeout, guest(plugin, store));
        let effects = self.store.data_mut().finish();
        result?.map(|answer| (answer, effects)).map_err(|e| CallError::trap(&e))
    }
}
