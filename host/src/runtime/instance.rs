//! One live plugin instance: its own wasmtime store, the limits it runs under (memory and
//! table caps, an epoch deadline per call) and the one path every call into the guest takes.
//!
//! Calls are async underneath (wasmtime's async support, WASI linked async) and run on the
//! caller's thread under a wall-clock deadline: guest code yields to the host at every
//! epoch tick, and a guest blocked inside a host call (a WASI sleep or poll) is waiting on a
//! future; either way the call's future is dropped at its deadline or when the plugin is
//! stopped, as wasmtime's CLI and Spin do, and the instance is then discarded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use wasmtime::Store;

use super::bindings::{self, GuestEnvelope, HandleError};
use super::capabilities::Capabilities;
use super::imports::{Call, HostState, StateView};
use super::limits::LimitHit;
use super::{LoadedComponent, Runtime};
use crate::effects::Effects;
use crate::keys::HostKey;
use crate::routing::Routing;

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
    /// Keys the ids of what the plugin publishes and broadcasts.
    pub key: HostKey,
    /// Cancelled when the plugin is stopped: a call in progress ends at once.
    pub cancel: CancellationToken,
    /// Requested when a command for the plugin comes in: an armed `handle` call ends.
    pub interrupt: Interrupt,
}

/// A request to end the `handle` call in progress so that a command can be answered (the
/// call is made again afterwards). An operator's command (pause, replay, swap...) always
/// ends it; a query only when the runner allows it (once per batch), so a slow plugin still
/// makes progress however often it is queried.
///
/// Commands are counted, not flagged: counted before they are sent and uncounted when the
/// runner takes them, so a call is never ended for a command already answered (which would
/// spend the batch's one query interruption on nothing and leave the next query waiting
/// for the whole call).
#[derive(Clone, Default)]
pub struct Interrupt(Arc<InterruptState>);

#[derive(Default)]
struct InterruptState {
    /// Operator's commands counted and not yet taken by the runner.
    commands: AtomicUsize,
    /// Queries counted and not yet taken.
    queries: AtomicUsize,
    /// A `handle` call is running.
    armed: AtomicBool,
    /// ... and a query may end it.
    for_queries: AtomicBool,
    notify: Notify,
}

impl Interrupt {
    fn counter(&self, query: bool) -> &AtomicUsize {
        if query { &self.0.queries } else { &self.0.commands }
    }

    /// A command is about to be sent (`query`: a query): counted before it is, so that a
    /// runner which finds the count but not yet the command waits for it.
    pub fn request(&self, query: bool) {
        self.counter(query).fetch_add(1, Ordering::AcqRel);
        self.0.notify.notify_waiters();
    }

    /// The runner took a requested command (or it could not be sent after all).
    pub fn taken(&self, query: bool) {
        let _ = self.counter(query).fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Whether an operator's command (not only queries) is waiting.
    pub fn operator_waiting(&self) -> bool {
        self.0.commands.load(Ordering::Acquire) > 0
    }

    /// Whether any requested command has not been taken yet.
    pub fn pending(&self) -> bool {
        self.operator_waiting() || self.0.queries.load(Ordering::Acquire) > 0
    }

    /// A `handle` call starts (`for_queries`: a query may end it too) or ends (`None`).
    pub fn arm(&self, armed: Option<bool>) {
        self.0.for_queries.store(armed == Some(true), Ordering::Release);
        self.0.armed.store(armed.is_some(), Ordering::Release);
    }

    fn due(&self) -> bool {
        let s = &self.0;
        s.armed.load(Ordering::Acquire)
            && (s.commands.load(Ordering::Acquire) > 0
                || (s.for_queries.load(Ordering::Acquire) && s.queries.load(Ordering::Acquire) > 0))
    }

    /// Resolves when the call should end; never while disarmed.
    async fn wait(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.due() {
                return;
            }
            notified.await;
        }
    }
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
    /// A command came in; the call was abandoned, to be made again after it.
    #[error("interrupted by a command")]
    Interrupted,
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
    interrupt: Interrupt,
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
        let stop = (&cx.cancel, &Interrupt::default());
        let plugin = bounded(&tokio, stop, INSTANTIATE_TIMEOUT, self.pre.instantiate_async(&mut store))?
            .map_err(|e| CallError::trap(&e))?;
        Ok(Instance { store, plugin, tokio, cancel: cx.cancel.clone(), interrupt: cx.interrupt.clone() })
    }
}

/// Run `call` on this thread until it ends, `timeout` passes, the plugin is stopped or
/// the call is interrupted.
fn bounded<R>(
    tokio: &tokio::runtime::Handle,
    (cancel, interrupt): (&CancellationToken, &Interrupt),
    timeout: Duration,
    call: impl Future<Output = R>,
) -> Result<R, CallError> {
    tokio.block_on(async {
        tokio::select! {
            ended = tokio::time::timeout(timeout, call) => {
                ended.map_err(|_| CallError::Timeout(format!("timed out after {} ms", timeout.as_millis())))
            }
            _ = cancel.cancelled() => Err(CallError::Cancelled),
            _ = interrupt.wait() => Err(CallError::Interrupted),
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
        let result = bounded(&self.tokio, (&self.cancel, &self.interrupt), timeout, guest(plugin, store));
        let effects = self.store.data_mut().finish();
        result?.map(|answer| (answer, effects)).map_err(|e| CallError::trap(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::Interrupt;

    #[test]
    fn a_command_taken_ends_no_later_call() {
        let interrupt = Interrupt::default();
        // Taken by a runner that was waiting (not in a call), then a call starts: it must
        // run, not end at once for a command already answered.
        interrupt.request(false);
        interrupt.taken(false);
        interrupt.request(true);
        interrupt.taken(true);
        interrupt.arm(Some(true));
        assert!(!interrupt.due() && !interrupt.pending());
        // A stray `taken` (a send that failed twice over) never makes the count wrap.
        interrupt.taken(false);
        interrupt.request(false);
        assert!(interrupt.due() && interrupt.operator_waiting());
    }

    #[test]
    fn a_query_ends_only_a_call_armed_for_queries_and_an_operator_any_armed_call() {
        let interrupt = Interrupt::default();
        interrupt.request(true);
        assert!(interrupt.pending() && !interrupt.operator_waiting());
        assert!(!interrupt.due(), "not armed: nothing to end");
        interrupt.arm(Some(false));
        assert!(!interrupt.due(), "this call runs to its end for queries");
        interrupt.arm(Some(true));
        assert!(interrupt.due());
        interrupt.taken(true);
        interrupt.arm(Some(false));
        interrupt.request(false);
        assert!(interrupt.due(), "an operator's command ends any call");
        interrupt.arm(None);
        assert!(!interrupt.due() && interrupt.pending());
    }
}
