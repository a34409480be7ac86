//! The host functions plugins import, one module per capability as Spin gives each its own
//! factor: `state` (reads and buffered writes through a `StateView`), `emit` (broadcast,
//! publish and send-http), `log` (log, now, and the guest's stdout/stderr). `HostState` is the data wasmtime
//! hands each of them; this module only routes a call to its factor.

mod emit;
mod log;
mod state;

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use state::{StateError, StateView};

use super::bindings::{GuestEnvelope, LogLevel, host, types};
use super::capabilities::{Capabilities, Refusal};
use super::instance::InstanceContext;
use super::limits::{LimitHit, LogBudget, OutputBudget, ResourceCaps, check_state_entry};
use crate::effects::Effects;
use emit::Emitter;
use state::StateAccess;

/// The per-instance data wasmtime hands to host functions.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// The instance's memory and table caps.
    pub(super) resources: ResourceCaps,
    /// What the current call has buffered for the host.
    output: OutputBudget,
    /// What the current call may still log.
    pub(super) log: Arc<LogBudget>,
    plugin: Arc<str>,
    caps: Arc<Capabilities>,
    /// true while serving `init` or `query`: nothing may be written
    read_only: bool,
    state: StateAccess,
    emit: Emitter,
}

/// What one buffered item costs the host beyond its bytes (its allocations, its ids and
/// envelope fields): charged to the output budget, so many tiny items are bounded too.
const ITEM_OVERHEAD: usize = 256;

/// What `broadcast`, `publish` and `send-http` answer: a trap, or the guest is told of a
/// refusal.
type Emitted = wasmtime::Result<Result<(), String>>;

/// Which guest export is being called, and with what batch: what the imports may do then.
pub(super) enum Call<'a> {
    /// `init` or `query`: reads only.
    ReadOnly,
    /// `handle` of this batch: writes, broadcasts and publishes are buffered.
    Handle(&'a Arc<[GuestEnvelope]>),
}

impl HostState {
    pub(super) fn new(cx: &InstanceContext) -> HostState {
        let log = LogBudget::new(cx.caps.limits.log);
        HostState {
            wasi: log::guest_wasi_ctx(&cx.plugin, &log),
            table: ResourceTable::new(),
            resources: ResourceCaps::new(cx.caps.limits.memory),
            output: OutputBudget::default(),
            log,
            plugin: cx.plugin.clone(),
            caps: cx.caps.clone(),
            read_only: false,
            state: StateAccess::new(cx.namespace.clone(), cx.store.clone()),
            emit: Emitter::new(cx.plugin.clone(), cx.routing.clone(), cx.key.clone()),
        }
    }

    /// Get ready for a call: a `handle` starts with nothing buffered and its batch known to
    /// `emit`; a read-only call may buffer nothing.
    pub(super) fn begin(&mut self, call: Call<'_>) {
        self.output.reset();
        self.log.reset();
        match call {
            Call::ReadOnly => self.read_only = true,
            Call::Handle(batch) => {
                self.state.discard_writes();
                self.emit.begin(batch.clone());
            }
        }
    }

    /// After a call: what it buffered (for the runner to commit if the call succeeded).
    pub(super) fn finish(&mut self) -> Effects {
        self.read_only = false;
        let emitted = self.emit.finish();
        Effects {
            state_writes: self.state.take_writes(),
            broadcasts: emitted.broadcasts,
            publishes: emitted.publishes,
            http: emitted.requests,
        }
    }

    fn need_state(&self) -> Result<(), Refusal> {
        self.caps.need_state(&self.plugin)
    }

    fn need_writable(&self, what: &'static str) -> Result<(), Refusal> {
        if self.read_only { Err(Refusal::ReadOnly(what)) } else { Ok(()) }
    }

    /// A broadcast or publish of `bytes`: allowed only in `handle`, charged to the output
    /// budget (both trap), then checked against the manifest (the guest is told).
    fn emit_one(
        &mut self,
        what: &'static str,
        bytes: usize,
        emit: impl FnOnce(&mut Emitter, &Capabilities) -> Result<(), Refusal>,
    ) -> Emitted {
        self.need_writable(what)?;
        self.take_output(bytes, what)?;
        Ok(emit(&mut self.emit, &self.caps).map_err(|refusal| refusal.to_string()))
    }

    /// Count `bytes` of `what` against the call's output budget.
    fn take_output(&mut self, bytes: usize, what: &str) -> Result<(), LimitHit> {
        self.output.take(&self.caps.limits, bytes, what)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types::Host for HostState {}

/// Refusals and limit hits returned here trap (the call fails, the instance is discarded);
/// those the guest is told about come back as `Ok(Err(message))`.
impl host::Host for HostState {
    async fn log(&mut self, level: LogLevel, message: String) -> wasmtime::Result<()> {
        if self.log.admit(&self.plugin, message.len()) {
            log::guest_log(&self.plugin, level, &message);
        }
        Ok(())
    }

    async fn now(&mut self) -> wasmtime::Result<u64> {
        Ok(crate::envelope::now_millis())
    }

    async fn state_get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        self.need_state()?;
        Ok(self.state.get(&key)?)
    }

    async fn state_set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<()> {
        self.need_state()?;
        self.need_writable("state-set")?;
        check_state_entry(&self.caps.limits, &key, Some(&value))?;
        self.take_output(ITEM_OVERHEAD + key.len() + value.len(), "a state write")?;
        self.state.write(key, Some(value));
        Ok(())
    }

    async fn state_delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.need_state()?;
        self.need_writable("state-delete")?;
        check_state_entry(&self.caps.limits, &key, None)?;
        self.take_output(ITEM_OVERHEAD + key.len(), "a state delete")?;
        self.state.write(key, None);
        Ok(())
    }

    async fn state_scan(&mut self, prefix: String) -> wasmtime::Result<Vec<(String, Vec<u8>)>> {
        self.need_state()?;
        // The result goes into guest memory: more than `memory_mb` could never fit.
        let cap = self.caps.limits.memory;
        match self.state.scan(&prefix, cap)? {
            Some(entries) => Ok(entries),
            None => {
                Err(LimitHit::new("memory_mb", format!("state-scan of {prefix:?} returns more than {} MiB", cap >> 20))
                    .into())
            }
        }
    }

    async fn broadcast(&mut self, cause: String, room: String, payload: String) -> Emitted {
        let bytes = ITEM_OVERHEAD + cause.len() + room.len() + payload.len();
        self.emit_one("broadcast", bytes, |emit, caps| emit.broadcast(caps, cause, room, payload))
    }

    async fn publish(&mut self, cause: String, event_type: String, data: String) -> Emitted {
        // A published event is kept parsed (an envelope): count it at twice its text.
        let bytes = ITEM_OVERHEAD + cause.len() + event_type.len() + 2 * data.len();
        self.emit_one("publish", bytes, |emit, caps| emit.publish(caps, cause, event_type, data))
    }

    async fn send_http(&mut self, cause: String, request: host::HttpRequest) -> Emitted {
        // Kept as given, then written to the log with the body in base64: count the body
        // twice.
        let headers: usize = request.headers.iter().map(|(n, v)| n.len() + v.len() + 16).sum();
        let bytes =
            ITEM_OVERHEAD + cause.len() + request.method.len() + request.url.len() + headers + 2 * request.body.len();
        self.emit_one("send-http", bytes, |emit, caps| emit.send_http(caps, cause, request))
    }
}
