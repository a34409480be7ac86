//! The plugin runner: one thread per plugin that polls its subscribed partitions from its
//! own offsets, calls `handle` with batches, and commits the batch's state writes, new
//! offsets, broadcasts and publishes in one transaction. Failures are retried on a fresh
//! instance; an event that still fails goes to the dead-letter topic and the plugin moves on.
//!
//! Here: the thread loop and the commands it takes between batches. `poll` reads a batch,
//! `batch` handles and commits it, `versions` swaps and promotes, `replay` replays; the
//! types they share (`offsets`, `seen`, `lifecycle`, `status`) and the one door to the log
//! (`log_access`) each have their own file.

mod batch;
mod dead_letter;
mod error;
mod lifecycle;
mod log_access;
mod offsets;
mod poll;
mod replay;
mod seen;
mod status;
mod versions;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::manifest::{Manifest, Start};
use crate::fanout::Hub;
use crate::keys::HostKey;
use crate::log::{EventLog, LogError};
use crate::routing::Routing;
use crate::runtime::{CallError, Instance, InstanceContext, Interrupt, LoadedComponent, Runtime};
use crate::store::Store;
use dead_letter::FAIL_AFTER_DEAD_LETTERS;
use lifecycle::Lifecycle;
use log_access::{LogAccess, Wake};
use seen::SeenIds;
use status::Rate;
use versions::Version;

pub use dead_letter::{DEAD_LETTER_TOPIC, DEAD_LETTER_TYPE};
pub use error::RunnerError;
pub use offsets::{Offsets, TopicPartition};
pub use poll::{NotAnEnvelope, guest_from_record};
pub use replay::ReplayFrom;
pub use status::{PluginStatus, QuerySlot, ReplayProgress, RunState, SharedStatus};

/// How long an idle runner waits before looking again (new partitions, commands).
const IDLE_WAIT: Duration = Duration::from_millis(500);
/// How long a runner waits before polling again after the log failed it.
const POLL_RETRY: Duration = Duration::from_secs(1);
/// How long a runner waits before reading a batch again after the store failed to commit it.
const COMMIT_RETRY: Duration = Duration::from_millis(500);

/// Where a command's outcome goes.
pub type Reply = oneshot::Sender<Result<(), RunnerError>>;

/// What a runner is asked to do; it acts between batches.
pub enum Command {
    Query {
        request: String,
        reply: oneshot::Sender<Result<String, RunnerError>>,
    },
    Pause(Reply),
    Resume(Reply),
    /// Replace the component and manifest, keeping offsets and state.
    Swap {
        component: LoadedComponent,
        manifest: Box<Manifest>,
        reply: Reply,
    },
    /// Drop state and offsets and read again from `from`.
    Replay {
        from: ReplayFrom,
        reply: Reply,
    },
    /// Take over a shadow's state and offsets, and its component and manifest.
    Promote {
        shadow_namespace: String,
        component: LoadedComponent,
        manifest: Box<Manifest>,
        /// The component and manifest, encoded, kept with the promotion's commit.
        version: Vec<u8>,
        reply: Reply,
    },
    Stop,
}

/// A live runner commits what the plugin does; a shadow runner keeps only its own state
/// and offsets, and drops its broadcasts and publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Live,
    Shadow,
}

/// What every runner shares.
pub struct RunnerDeps {
    pub runtime: Arc<Runtime>,
    pub log: Arc<dyn EventLog>,
    pub store: Arc<Store>,
    pub routing: Arc<Routing>,
    /// Keys output and dead-letter ids.
    pub key: HostKey,
    pub hub: Hub,
    /// Poked after a commit that put events in the outbox.
    pub outbox: Arc<Notify>,
    /// This host's id (`Store::host_id`): marks its copies of HTTP requests.
    pub host_id: u64,
    /// Runners are plain threads; they reach the async log through this runtime.
    pub tokio: tokio::runtime::Handle,
}

/// What a runner runs, and as whom.
pub struct RunnerSpec {
    pub name: String,
    /// Whose state and offsets: the name, or the shadow's own key space.
    pub namespace: String,
    pub mode: Mode,
    pub component: LoadedComponent,
    pub manifest: Manifest,
}

/// The registry's side of a runner: the status it shows, and where commands go.
pub struct RunnerHandle {
    pub status: SharedStatus,
    pub commands: mpsc::UnboundedSender<Command>,
    /// Cancel to end the call in progress at once (the runner is being stopped).
    pub cancel: CancellationToken,
    /// Request after sending a command, so that a long `handle` call does not delay it.
    pub interrupt: Interrupt,
}

pub struct Runner {
    name: Arc<str>,
    namespace: Arc<str>,
    mode: Mode,
    version: Version,
    deps: Arc<RunnerDeps>,
    log: LogAccess,
    status: SharedStatus,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Absent after a failed call, until the next call makes a fresh one.
    instance: Option<Instance>,
    /// The next offset to read, per partition.
    positions: Offsets,
    lifecycle: Lifecycle,
    /// Events sent to the dead-letter topic in a row.
    dead_letter_streak: u32,
    rate: Rate,
    seen: SeenIds,
    /// The next batch, being read while this one is handled.
    ahead: poll::ReadAhead,
    /// Cancelled when the runner is stopped: ends a call in progress.
    cancel: CancellationToken,
    /// Requested by whoever sends a command: ends an armed `handle` call.
    interrupt: Interrupt,
    /// Whether a query may interrupt the next `handle` call: not right after one did, so
    /// that the batch then completes however often the plugin is queried (an operator's
    /// command always may, and allows it again).
    interruptible: bool,
}

impl Runner {
    pub fn new(spec: RunnerSpec, deps: Arc<RunnerDeps>) -> (Runner, RunnerHandle) {
        let RunnerSpec { name, namespace, mode, component, manifest } = spec;
        let status = SharedStatus::new(PluginStatus::new(&name, &component.hash));
        let (commands, receiver) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let interrupt = Interrupt::default();
        let runner = Runner {
            name: name.into(),
            namespace: namespace.into(),
            mode,
            version: Version::new(component, manifest),
            log: LogAccess::new(deps.log.clone(), deps.tokio.clone()),
            deps,
            status: status.clone(),
            commands: receiver,
            instance: None,
            positions: Offsets::default(),
            lifecycle: Lifecycle::Running,
            dead_letter_streak: 0,
            rate: Rate::default(),
            seen: SeenIds::default(),
            ahead: poll::ReadAhead::default(),
            cancel: cancel.clone(),
            interrupt: interrupt.clone(),
            interruptible: true,
        };
        (runner, RunnerHandle { status, commands, cancel, interrupt })
    }

    fn publish_state(&self) {
        let state = self.lifecycle.state();
        self.status.update(|s| s.state = state);
    }

    fn show_offsets(&self) {
        let offsets = self.positions.clone();
        self.status.update(|s| s.offsets = offsets);
    }

    /// The runner's thread body: returns when told to stop. `ready` is told once the
    /// plugin has started (or failed to), with its offsets known.
    pub fn run(mut self, ready: oneshot::Sender<()>) {
        let span = tracing::info_span!("plugin", plugin = &*self.name, shadow = self.mode == Mode::Shadow);
        let _guard = span.enter();
        match self.start() {
            Ok(()) => tracing::info!(version = %&self.version.component.hash[..12], "plugin running"),
            Err(error) => {
                tracing::error!(%error, "plugin failed to start");
                self.lifecycle.fail();
                self.status.update(|s| s.last_error = Some(error.to_string()));
            }
        }
        self.publish_state();
        let _ = ready.send(());
        let mut changes = self.log.changes();
        while self.step(&mut changes).is_continue() {}
        self.status.update(|s| s.state = RunState::Stopped);
        tracing::info!("plugin stopped");
    }

    /// One turn of the loop: the commands that came, then one batch or a wait for one.
    /// `Break` when told to stop.
    fn step(&mut self, changes: &mut watch::Receiver<u64>) -> ControlFlow<()> {
        self.drain_commands()?;
        if !self.lifecycle.is_reading() {
            // Paused or failed: only a command can change that.
            return match self.commands.blocking_recv() {
                Some(command) => self.command(command),
                None => ControlFlow::Break(()),
            };
        }
        self.rate.tick(&self.status);
        changes.borrow_and_update();
        let polled = match self.poll_batch() {
            Ok(polled) => polled,
            Err(error) => {
                tracing::warn!(%error, "polling the log failed; retrying");
                return self.wait(changes, POLL_RETRY);
            }
        };
        if polled.is_empty() {
            if self.lifecycle.replaying().is_some() {
                self.finish_replay_if_done();
                return ControlFlow::Continue(());
            }
            self.refresh_partitions();
            return self.wait(changes, IDLE_WAIT);
        }
        self.read_ahead(&polled);
        if let Err(error) = self.process(polled) {
            // Only the store can fail here: nothing was committed, so the batch will be
            // read again.
            tracing::error!(%error, "committing a batch failed; retrying");
            self.status.note_error(error.to_string());
            std::thread::sleep(COMMIT_RETRY);
            self.reload_positions();
        }
        self.finish_replay_if_done();
        if self.dead_letter_streak >= FAIL_AFTER_DEAD_LETTERS {
            let message = format!("{FAIL_AFTER_DEAD_LETTERS} events in a row failed; plugin stopped");
            tracing::error!("{message}");
            self.lifecycle.fail();
            self.status.update(|s| s.last_error = Some(message));
            self.publish_state();
        }
        ControlFlow::Continue(())
    }

    fn start(&mut self) -> Result<(), RunnerError> {
        self.status.set_query_limits(&self.version.manifest.limits);
        if self.mode == Mode::Shadow {
            self.deps.store.reset_plugin(&self.namespace)?;
        }
        self.instance = Some(self.new_instance().map_err(RunnerError::Init)?);
        let topics = self.subscribed_topics()?;
        self.log.ensure_topics(&topics)?;
        self.reload_positions();
        // A replay under way when the host stopped goes on, still quiet for what the
        // plugin had handled.
        if self.mode == Mode::Live
            && let Some(stored) = self.deps.store.replay(&self.namespace)?
        {
            tracing::info!("resuming the replay under way");
            self.lifecycle.set_replay(replay::Replay::from_stored(stored));
            self.finish_replay_if_done();
        }
        Ok(())
    }

    fn new_instance(&self) -> Result<Instance, CallError> {
        let manifest = &self.version.manifest;
        let cx = InstanceContext {
            plugin: self.name.clone(),
            namespace: self.namespace.clone(),
            caps: Arc::new(manifest.capabilities()),
            store: self.deps.store.clone(),
            routing: self.deps.routing.clone(),
            key: self.deps.key.clone(),
            cancel: self.cancel.clone(),
            interrupt: self.interrupt.clone(),
        };
        let mut instance = self.version.component.instantiate(&self.deps.runtime, &cx)?;
        instance.init(&manifest.config_json(), self.version.timeout)?;
        Ok(instance)
    }

    /// The instance to call, made afresh if the last one was dropped.
    fn instance(&mut self) -> Result<&mut Instance, RunnerError> {
        let instance = match self.instance.take() {
            Some(instance) => instance,
            None => self.new_instance().map_err(RunnerError::Instantiate)?,
        };
        Ok(self.instance.insert(instance))
    }

    fn subscribed_topics(&self) -> Result<Vec<String>, LogError> {
        let named = &self.version.manifest.subscribe.topics;
        if !named.is_empty() {
            return Ok(named.clone());
        }
        let mut topics = self.log.topics()?;
        topics.retain(|t| !crate::topics::is_internal(t));
        Ok(topics)
    }

    /// Positions from the store; partitions never read start per the manifest.
    fn reload_positions(&mut self) {
        let stored = match self.deps.store.offsets(&self.namespace) {
            Ok(stored) => stored,
            Err(error) => {
                tracing::error!(%error, "reading offsets failed");
                return;
            }
        };
        let topics = self.subscribed_topics().unwrap_or_default();
        self.positions = Offsets::from(stored);
        self.positions.retain(|tp| topics.contains(&tp.topic));
        self.refresh_partitions();
        self.seen.forget();
    }

    /// Pick up topics and partitions that appeared since the last look.
    fn refresh_partitions(&mut self) {
        let Ok(topics) = self.subscribed_topics() else { return };
        let start = if self.mode == Mode::Shadow { Start::Earliest } else { self.version.manifest.subscribe.start };
        for topic in topics {
            let Ok(partitions) = self.log.partitions(&topic) else { continue };
            for partition in 0..partitions {
                let tp = TopicPartition::new(topic.clone(), partition);
                if self.positions.contains(&tp) {
                    continue;
                }
                let first = match start {
                    Start::Earliest => 0,
                    Start::Latest => self.log.high_watermark(&tp).unwrap_or(0),
                };
                self.positions.insert(tp, first);
            }
        }
        self.show_offsets();
    }

    /// Wait for the log to change, a command or `timeout`; `Break` when told to stop.
    fn wait(&mut self, changes: &mut watch::Receiver<u64>, timeout: Duration) -> ControlFlow<()> {
        match self.log.wait(changes, &mut self.commands, timeout) {
            Wake::Look => ControlFlow::Continue(()),
            Wake::Command(command) => self.command(command),
            Wake::Closed => ControlFlow::Break(()),
        }
    }

    /// Act on every command waiting, including one counted and not sent yet (its sender is
    /// between the two: it comes at once); `Break` if one of them was to stop.
    fn drain_commands(&mut self) -> ControlFlow<()> {
        let mut flow = ControlFlow::Continue(());
        loop {
            let command = match self.commands.try_recv() {
                Ok(command) => command,
                Err(mpsc::error::TryRecvError::Empty) if self.interrupt.pending() => {
                    match self.commands.blocking_recv() {
                        Some(command) => command,
                        None => return ControlFlow::Break(()),
                    }
                }
                Err(_) => return flow,
            };
            if self.command(command).is_break() {
                flow = ControlFlow::Break(());
            }
        }
    }

    fn command(&mut self, command: Command) -> ControlFlow<()> {
        let query = matches!(command, Command::Query { .. });
        // What was read ahead is for the positions and plan before the command: read again.
        if !query {
            self.drop_read_ahead();
        }
        self.interrupt.taken(query);
        if !query {
            self.interruptible = true;
        }
        match command {
            Command::Stop => return ControlFlow::Break(()),
            Command::Query { request, reply } => {
                // An asker past its deadline has gone: its query is not run.
                if !reply.is_closed() {
                    let _ = reply.send(self.query(&request));
                }
            }
            Command::Pause(reply) => {
                self.lifecycle.pause();
                tracing::info!("paused");
                self.publish_state();
                let _ = reply.send(Ok(()));
            }
            Command::Resume(reply) => {
                self.lifecycle.resume();
                tracing::info!("resumed");
                self.publish_state();
                let _ = reply.send(Ok(()));
            }
            Command::Swap { component, manifest, reply } => {
                let started = Instant::now();
                let result = self.swap(component, *manifest);
                let micros = started.elapsed().as_micros() as u64;
                self.status.update(|s| {
                    s.last_swap_micros = Some(micros);
                    s.swaps += u64::from(result.is_ok());
                });
                let _ = reply.send(result);
                self.publish_state();
            }
            // The state is published before the answer, so a status read after it says so.
            Command::Replay { from, reply } => {
                let started = self.start_replay(from);
                self.publish_state();
                let _ = reply.send(started);
            }
            Command::Promote { shadow_namespace, component, manifest, version, reply } => {
                let promoted = self.promote(&shadow_namespace, component, *manifest, &version);
                self.publish_state();
                let _ = reply.send(promoted);
            }
        }
        ControlFlow::Continue(())
    }

    fn query(&mut self, request: &str) -> Result<String, RunnerError> {
        let timeout = self.version.query_timeout;
        let answer = self.instance()?.query(request, timeout);
        if let Err(error @ (CallError::Trap(_) | CallError::Timeout(_) | CallError::Limit(_))) = &answer {
            tracing::warn!(%error, "query failed; the next call gets a fresh instance");
            // Made lazily, by the next call: a plugin whose `init` hangs must not hold the
            // runner here for another deadline.
            self.instance = None;
        }
        Ok(answer?)
    }
}
