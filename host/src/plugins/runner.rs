//! The plugin runner: one thread per plugin that polls its subscribed partitions from its
//! own offsets, calls `handle` with batches, and commits the batch's state writes, new
//! offsets, broadcasts and publishes in one transaction. Failures are retried on a fresh
//! instance; an event that still fails goes to the dead-letter topic and the plugin moves on.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::RunnerDeps;
use super::manifest::{Manifest, Start};
use crate::envelope::{Envelope, Pattern};
use crate::log::{AppendItem, LogError, Record};
use crate::runtime::{CallError, GuestEnvelope, Instance, InstanceContext, LoadedComponent};
use crate::store::BatchCommit;

pub use crate::topics::{DEAD_LETTER_TYPE, DEAD_LETTERS as DEAD_LETTER_TOPIC};
/// Consecutive dead letters after which a plugin is marked failed and stops.
const FAIL_AFTER_DEAD_LETTERS: u32 = 100;
/// Event ids remembered to skip redelivered copies (Iggy can hold an event twice when a
/// send is retried after a lost acknowledgement).
const SEEN_WINDOW: usize = 10_000;
/// Records read back per partition at start to rebuild that memory: at least what one
/// forwarding round can resend after a crash.
const SEEN_PRIME: u64 = crate::log::REDELIVERY_WINDOW;
/// How long an idle runner waits before looking again (new partitions, commands).
const IDLE_WAIT: Duration = Duration::from_millis(500);

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

/// Where a replay starts.
#[derive(Debug, Clone)]
pub enum ReplayFrom {
    /// Offset zero of every partition.
    Start,
    /// topic → partition → offset; partitions not named start at zero.
    Offsets(BTreeMap<String, BTreeMap<u32, u64>>),
    /// The first event of each partition whose timestamp is at or after this one.
    Timestamp(chrono::DateTime<chrono::Utc>),
}

/// What `GET /api/plugins` shows of a plugin.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginStatus {
    pub name: String,
    pub version: String,
    pub state: RunState,
    pub loaded_at: String,
    /// topic → partition → next offset to read
    pub offsets: BTreeMap<String, BTreeMap<u32, u64>>,
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
}

impl PluginStatus {
    pub fn new(name: &str, version: &str) -> Self {
        PluginStatus {
            name: name.to_owned(),
            version: version.to_owned(),
            state: RunState::Starting,
            loaded_at: crate::envelope::now_rfc3339(),
            offsets: BTreeMap::new(),
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
        }
    }
}

type Reply = oneshot::Sender<Result<(), String>>;

/// What a runner is asked to do; it acts between batches.
pub enum Command {
    Query {
        request: String,
        reply: oneshot::Sender<Result<String, String>>,
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

pub struct Runner {
    name: Arc<str>,
    /// Whose state and offsets: the name, or the shadow's own key space.
    namespace: Arc<str>,
    mode: Mode,
    manifest: Manifest,
    component: LoadedComponent,
    deps: Arc<RunnerDeps>,
    status: Arc<Mutex<PluginStatus>>,
    commands: mpsc::UnboundedReceiver<Command>,
    instance: Option<Instance>,
    patterns: Vec<Pattern>,
    timeout: Duration,
    /// (topic, partition) → next offset to read
    positions: BTreeMap<(String, u32), u64>,
    consecutive_dead_letters: u32,
    stopping: bool,
    paused: bool,
    failed: bool,
    /// While replaying: (topic, partition) → the high watermark when the replay began.
    /// Broadcasts of these already-delivered events are not sent again.
    replay: Option<BTreeMap<(String, u32), u64>>,
    rate_since: Instant,
    rate_processed: u64,
    /// Recently applied event ids, oldest first.
    seen: HashSet<u128>,
    seen_order: VecDeque<u128>,
    /// Partitions whose recent ids are in `seen`.
    primed: HashSet<(String, u32)>,
}

/// One record of a polled batch, decoded (or not).
struct Polled {
    topic: String,
    record: Record,
    /// The event id and what the plugin gets, or why the record is not a valid envelope.
    /// The guest envelope is taken out when the event is delivered.
    event: Result<(u128, Option<GuestEnvelope>), String>,
}

impl Runner {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        namespace: &str,
        mode: Mode,
        manifest: Manifest,
        component: LoadedComponent,
        deps: Arc<RunnerDeps>,
        status: Arc<Mutex<PluginStatus>>,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> Runner {
        let patterns = manifest.event_patterns();
        let timeout = Duration::from_millis(manifest.limits.batch_timeout_ms);
        Runner {
            name: name.into(),
            namespace: namespace.into(),
            mode,
            manifest,
            component,
            deps,
            status,
            commands,
            instance: None,
            patterns,
            timeout,
            positions: BTreeMap::new(),
            consecutive_dead_letters: 0,
            stopping: false,
            paused: false,
            failed: false,
            replay: None,
            rate_since: Instant::now(),
            rate_processed: 0,
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            primed: HashSet::new(),
        }
    }

    fn publish_state(&self) {
        let state = if self.failed {
            RunState::Failed
        } else if self.paused {
            RunState::Paused
        } else if self.replay.is_some() {
            RunState::Replaying
        } else {
            RunState::Running
        };
        self.set_status(|s| s.state = state);
    }

    fn set_status(&self, f: impl FnOnce(&mut PluginStatus)) {
        f(&mut self.status.lock().expect("status lock"));
    }

    fn note_error(&self, message: &str) {
        self.set_status(|s| {
            s.errors += 1;
            s.last_error = Some(message.to_owned());
        });
    }

    /// The runner's thread body: returns when told to stop. `ready` is told once the
    /// plugin has started (or failed to), with its offsets known.
    pub fn run(mut self, ready: oneshot::Sender<()>) {
        let span = tracing::info_span!("plugin", plugin = &*self.name, shadow = self.mode == Mode::Shadow);
        let _guard = span.enter();
        match self.start() {
            Ok(()) => tracing::info!(version = %&self.component.hash[..12], "plugin running"),
            Err(message) => {
                tracing::error!(error = %message, "plugin failed to start");
                self.failed = true;
                self.set_status(|s| s.last_error = Some(message));
            }
        }
        self.publish_state();
        let _ = ready.send(());
        let mut changes = self.deps.log.changes();
        while !self.stopping {
            self.drain_commands();
            if self.stopping {
                break;
            }
            if self.paused || self.failed {
                match self.commands.blocking_recv() {
                    Some(command) => self.command(command),
                    None => self.stopping = true,
                }
                continue;
            }
            self.tick_rate();
            changes.borrow_and_update();
            let polled = match self.poll_batch() {
                Ok(polled) => polled,
                Err(e) => {
                    tracing::warn!(error = %e, "polling the log failed; retrying");
                    self.wait(&mut changes, Duration::from_secs(1));
                    continue;
                }
            };
            if polled.is_empty() {
                if self.replay.is_some() {
                    self.finish_replay_if_done();
                    continue;
                }
                self.refresh_partitions();
                self.wait(&mut changes, IDLE_WAIT);
                continue;
            }
            if let Err(message) = self.process(polled) {
                // Only the store can fail here: nothing was committed, so the batch will
                // be read again.
                tracing::error!(error = %message, "committing a batch failed; retrying");
                self.note_error(&message);
                std::thread::sleep(Duration::from_millis(500));
                self.reload_positions();
            }
            self.finish_replay_if_done();
            if self.consecutive_dead_letters >= FAIL_AFTER_DEAD_LETTERS {
                let message = format!("{FAIL_AFTER_DEAD_LETTERS} events in a row failed; plugin stopped");
                tracing::error!("{message}");
                self.failed = true;
                self.set_status(|s| s.last_error = Some(message));
                self.publish_state();
            }
        }
        self.set_status(|s| s.state = RunState::Stopped);
        tracing::info!("plugin stopped");
    }

    fn tick_rate(&mut self) {
        let elapsed = self.rate_since.elapsed();
        if elapsed < Duration::from_secs(1) {
            return;
        }
        let processed = self.status.lock().expect("status lock").processed;
        let rate = (processed - self.rate_processed.min(processed)) as f64 / elapsed.as_secs_f64();
        self.rate_since = Instant::now();
        self.rate_processed = processed;
        self.set_status(|s| s.events_per_second = (rate * 10.0).round() / 10.0);
    }

    fn start(&mut self) -> Result<(), String> {
        if self.mode == Mode::Shadow {
            self.deps.store.reset_plugin(&self.namespace).map_err(|e| e.to_string())?;
        }
        self.instance = Some(self.new_instance().map_err(|e| format!("init: {e}"))?);
        let topics = self.subscribed_topics().map_err(|e| e.to_string())?;
        self.deps.block_on(self.deps.log.ensure_topics(&topics)).map_err(|e| e.to_string())?;
        self.reload_positions();
        Ok(())
    }

    fn new_instance(&self) -> Result<Instance, CallError> {
        let cx = InstanceContext {
            plugin: self.name.clone(),
            namespace: self.namespace.clone(),
            caps: Arc::new(self.manifest.capabilities()),
            store: self.deps.store.clone(),
            routing: self.deps.routing.clone(),
        };
        let mut instance = self.component.instantiate(&self.deps.runtime, &cx)?;
        instance.init(&self.manifest.config_json(), self.timeout)?;
        Ok(instance)
    }

    fn subscribed_topics(&self) -> Result<Vec<String>, LogError> {
        if !self.manifest.subscribe.topics.is_empty() {
            return Ok(self.manifest.subscribe.topics.clone());
        }
        let mut topics = self.deps.block_on(self.deps.log.topics())?;
        topics.retain(|t| !crate::topics::is_internal(t));
        Ok(topics)
    }

    /// Positions from the store; partitions never read start per the manifest.
    fn reload_positions(&mut self) {
        let stored = match self.deps.store.offsets(&self.namespace) {
            Ok(stored) => stored,
            Err(e) => {
                tracing::error!(error = %e, "reading offsets failed");
                return;
            }
        };
        let topics = self.subscribed_topics().unwrap_or_default();
        self.positions.clear();
        for ((topic, partition), next) in stored {
            if topics.contains(&topic) {
                self.positions.insert((topic, partition), next);
            }
        }
        self.refresh_partitions();
        self.prime_seen();
    }

    /// Forget the remembered ids; each partition's are read back before it is next polled.
    fn prime_seen(&mut self) {
        self.seen.clear();
        self.seen_order.clear();
        self.primed.clear();
    }

    /// Remember the ids of the records just before each position, so that a copy of one of
    /// them further on is recognised. Fails (to be retried) while the log cannot be read:
    /// polling on without them could apply a redelivered event twice.
    fn ensure_primed(&mut self) -> Result<(), LogError> {
        let todo: Vec<((String, u32), u64)> =
            self.positions.iter().filter(|(k, _)| !self.primed.contains(*k)).map(|(k, v)| (k.clone(), *v)).collect();
        for ((topic, partition), next) in todo {
            let from = next.saturating_sub(SEEN_PRIME);
            if from < next {
                let want = usize::try_from(next - from).unwrap_or(usize::MAX);
                let records = self.deps.block_on(self.deps.log.poll(&topic, partition, from, want))?;
                let ids: Vec<u128> = records
                    .iter()
                    .filter(|r| r.offset < next)
                    .filter_map(|r| Envelope::from_bytes(&r.payload).ok().map(|e| e.event_id.as_u128()))
                    .collect();
                self.remember(ids);
            }
            self.primed.insert((topic, partition));
        }
        Ok(())
    }

    fn remember(&mut self, ids: impl IntoIterator<Item = u128>) {
        for id in ids {
            if self.seen.insert(id) {
                self.seen_order.push_back(id);
                if self.seen_order.len() > SEEN_WINDOW
                    && let Some(old) = self.seen_order.pop_front()
                {
                    self.seen.remove(&old);
                }
            }
        }
    }

    /// Pick up topics and partitions that appeared since the last look.
    fn refresh_partitions(&mut self) {
        let Ok(topics) = self.subscribed_topics() else { return };
        for topic in topics {
            let Ok(partitions) = self.deps.block_on(self.deps.log.partitions(&topic)) else { continue };
            for partition in 0..partitions {
                if self.positions.contains_key(&(topic.clone(), partition)) {
                    continue;
                }
                let start = if self.mode == Mode::Shadow { Start::Earliest } else { self.manifest.subscribe.start };
                let start = match start {
                    Start::Earliest => 0,
                    Start::Latest => self.deps.block_on(self.deps.log.high_watermark(&topic, partition)).unwrap_or(0),
                };
                self.positions.insert((topic.clone(), partition), start);
            }
        }
        let offsets = self.offsets_view();
        self.set_status(|s| s.offsets = offsets);
    }

    fn offsets_view(&self) -> BTreeMap<String, BTreeMap<u32, u64>> {
        let mut view: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
        for ((topic, partition), next) in &self.positions {
            view.entry(topic.clone()).or_default().insert(*partition, *next);
        }
        view
    }

    /// Read up to `max_batch` records across the subscribed partitions.
    fn poll_batch(&mut self) -> Result<Vec<Polled>, LogError> {
        self.ensure_primed()?;
        let max = self.manifest.limits.max_batch;
        // While replaying, read only up to where the replay began (so a batch is wholly
        // replayed events or wholly new ones).
        let mut open: Vec<((String, u32), u64, u64)> = self
            .positions
            .iter()
            .filter_map(|(k, from)| {
                let until = self.replay.as_ref().map_or(Some(u64::MAX), |t| t.get(k).copied().filter(|t| t > from))?;
                Some((k.clone(), *from, until))
            })
            .collect();
        // All partitions at once (one round trip, not one per partition, on a remote log),
        // a fair share each; then the partitions that filled their share split what is left.
        let mut polled: Vec<Polled> = Vec::new();
        for _round in 0..2 {
            let budget = max.saturating_sub(polled.len());
            if open.is_empty() || budget == 0 {
                break;
            }
            let share = (budget / open.len()).max(1);
            let log = &self.deps.log;
            let reads = open.iter().map(|((topic, partition), from, until)| {
                let want = share.min(usize::try_from(until - from).unwrap_or(usize::MAX));
                async move { (want, log.poll(topic, *partition, *from, want).await) }
            });
            let results = self.deps.block_on(futures_util::future::join_all(reads));
            let mut still_open = Vec::new();
            for (((topic, partition), from, until), (want, records)) in open.into_iter().zip(results) {
                let records = records?;
                let full = records.len() == want;
                let next = records.last().map_or(from, |r| r.offset + 1);
                for record in records {
                    let event = guest_from_record(&topic, &record).map(|(id, guest)| (id, Some(guest)));
                    polled.push(Polled { topic: topic.clone(), record, event });
                }
                if full && next < until {
                    still_open.push(((topic, partition), next, until));
                }
            }
            open = still_open;
        }
        Ok(polled)
    }

    fn wait(&mut self, changes: &mut tokio::sync::watch::Receiver<u64>, timeout: Duration) {
        let deps = self.deps.clone();
        let command = deps.block_on(async {
            tokio::select! {
                _ = changes.changed() => None,
                command = self.commands.recv() => Some(command),
                _ = tokio::time::sleep(timeout) => None,
            }
        });
        match command {
            Some(Some(command)) => self.command(command),
            Some(None) => self.stopping = true,
            None => {}
        }
    }

    fn drain_commands(&mut self) {
        while let Ok(command) = self.commands.try_recv() {
            self.command(command);
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Stop => self.stopping = true,
            Command::Query { request, reply } => {
                let answer = self.query(&request);
                let _ = reply.send(answer);
            }
            Command::Pause(reply) => {
                self.paused = true;
                tracing::info!("paused");
                self.publish_state();
                let _ = reply.send(Ok(()));
            }
            Command::Resume(reply) => {
                self.paused = false;
                tracing::info!("resumed");
                self.publish_state();
                let _ = reply.send(Ok(()));
            }
            Command::Swap { component, manifest, reply } => {
                let started = Instant::now();
                let result = self.swap(component, *manifest);
                let micros = started.elapsed().as_micros() as u64;
                self.set_status(|s| s.last_swap_micros = Some(micros));
                let _ = reply.send(result);
                self.publish_state();
            }
            Command::Replay { from, reply } => {
                let _ = reply.send(self.start_replay(from));
                self.publish_state();
            }
            Command::Promote { shadow_namespace, component, manifest, reply } => {
                let _ = reply.send(self.promote(&shadow_namespace, component, *manifest));
                self.publish_state();
            }
        }
    }

    /// Install a new version at this batch boundary; offsets and state stay. If the new
    /// version cannot start, the old one keeps running and the error is returned.
    fn swap(&mut self, component: LoadedComponent, manifest: Manifest) -> Result<(), String> {
        let old_component = std::mem::replace(&mut self.component, component);
        let old_manifest = std::mem::replace(&mut self.manifest, manifest);
        self.apply_manifest();
        match self.new_instance() {
            Ok(instance) => self.instance = Some(instance),
            Err(e) => {
                self.component = old_component;
                self.manifest = old_manifest;
                self.apply_manifest();
                self.instance = self.new_instance().ok();
                let message = format!("new version not started: {e}");
                self.set_status(|s| s.last_error = Some(message.clone()));
                return Err(message);
            }
        }
        self.failed = false;
        self.consecutive_dead_letters = 0;
        self.reload_positions();
        let hash = self.component.hash.clone();
        tracing::info!(version = %&hash[..12], "new version swapped in");
        self.set_status(|s| {
            s.version = hash;
            s.loaded_at = crate::envelope::now_rfc3339();
        });
        Ok(())
    }

    fn apply_manifest(&mut self) {
        self.patterns = self.manifest.event_patterns();
        self.timeout = Duration::from_millis(self.manifest.limits.batch_timeout_ms);
    }

    fn start_replay(&mut self, from: ReplayFrom) -> Result<(), String> {
        let topics = self.subscribed_topics().map_err(|e| e.to_string())?;
        let mut start = BTreeMap::new();
        let mut target = BTreeMap::new();
        for topic in topics {
            let partitions = self.deps.block_on(self.deps.log.partitions(&topic)).map_err(|e| e.to_string())?;
            for partition in 0..partitions {
                let high =
                    self.deps.block_on(self.deps.log.high_watermark(&topic, partition)).map_err(|e| e.to_string())?;
                let first = match &from {
                    ReplayFrom::Start => 0,
                    ReplayFrom::Offsets(offsets) => {
                        offsets.get(&topic).and_then(|p| p.get(&partition)).copied().unwrap_or(0).min(high)
                    }
                    ReplayFrom::Timestamp(at) => self.first_offset_at(&topic, partition, *at, high)?,
                };
                start.insert((topic.clone(), partition), first);
                target.insert((topic.clone(), partition), high);
            }
        }
        self.deps.store.reset_plugin(&self.namespace).map_err(|e| e.to_string())?;
        let commit = BatchCommit {
            offsets: start.iter().map(|((t, p), n)| (t.clone(), *p, *n)).collect(),
            ..BatchCommit::default()
        };
        self.commit(commit)?;
        let total: u64 = target.iter().map(|(k, high)| high - start[k]).sum();
        self.positions = start;
        self.prime_seen();
        self.replay = Some(target);
        // Fresh memory too: a guest may cache what it read from state.
        self.instance = self.new_instance().ok();
        self.failed = false;
        self.paused = false;
        self.consecutive_dead_letters = 0;
        tracing::info!(events = total, "replay started");
        self.set_status(|s| {
            s.replay =
                Some(ReplayProgress { done: 0, total, started_at: crate::envelope::now_rfc3339(), finished_at: None });
            s.processed = 0;
        });
        self.update_replay_progress();
        Ok(())
    }

    fn first_offset_at(
        &self,
        topic: &str,
        partition: u32,
        at: chrono::DateTime<chrono::Utc>,
        high: u64,
    ) -> Result<u64, String> {
        let mut from = 0;
        while from < high {
            let records =
                self.deps.block_on(self.deps.log.poll(topic, partition, from, 1000)).map_err(|e| e.to_string())?;
            let Some(last) = records.last().map(|r| r.offset) else { break };
            for record in &records {
                let when = Envelope::from_bytes(&record.payload)
                    .ok()
                    .and_then(|e| chrono::DateTime::parse_from_rfc3339(&e.timestamp).ok());
                if when.is_some_and(|w| w >= at) {
                    return Ok(record.offset);
                }
            }
            from = last + 1;
        }
        Ok(high)
    }

    fn update_replay_progress(&self) {
        let Some(target) = &self.replay else { return };
        let remaining: u64 =
            target.iter().map(|(k, high)| high.saturating_sub(self.positions.get(k).copied().unwrap_or(0))).sum();
        self.set_status(|s| {
            if let Some(progress) = s.replay.as_mut() {
                progress.done = progress.total.saturating_sub(remaining);
            }
        });
    }

    fn finish_replay_if_done(&mut self) {
        let Some(target) = &self.replay else { return };
        self.update_replay_progress();
        if target.iter().all(|(k, high)| self.positions.get(k).is_some_and(|p| p >= high)) {
            self.replay = None;
            self.set_status(|s| {
                if let Some(progress) = s.replay.as_mut() {
                    progress.finished_at = Some(crate::envelope::now_rfc3339());
                }
            });
            tracing::info!("replay caught up");
            self.publish_state();
        }
    }

    /// Become the shadow's version with the shadow's state and offsets. Events the old
    /// version already handled are not broadcast again.
    fn promote(
        &mut self,
        shadow_namespace: &str,
        component: LoadedComponent,
        manifest: Manifest,
    ) -> Result<(), String> {
        let handled = self.positions.clone();
        self.deps.store.promote_namespace(shadow_namespace, &self.namespace).map_err(|e| e.to_string())?;
        self.component = component;
        self.manifest = manifest;
        self.apply_manifest();
        self.instance = None;
        self.reload_positions();
        let behind: BTreeMap<(String, u32), u64> =
            handled.into_iter().filter(|(k, old)| self.positions.get(k).is_some_and(|new| new < old)).collect();
        if !behind.is_empty() {
            self.replay = Some(behind);
        }
        self.failed = false;
        self.consecutive_dead_letters = 0;
        let hash = self.component.hash.clone();
        let result = self.new_instance().map(|i| self.instance = Some(i)).map_err(|e| format!("promoted version: {e}"));
        tracing::info!(version = %&hash[..12], "shadow promoted");
        self.set_status(|s| {
            s.version = hash;
            s.loaded_at = crate::envelope::now_rfc3339();
            s.replay = None;
        });
        result
    }

    fn query(&mut self, request: &str) -> Result<String, String> {
        if self.instance.is_none() {
            self.instance = Some(self.new_instance().map_err(|e| format!("instantiating: {e}"))?);
        }
        let instance = self.instance.as_mut().expect("instance present");
        match instance.query(request, self.timeout) {
            Ok(answer) => Ok(answer),
            Err(CallError::Failed { message, .. }) => Err(message),
            Err(CallError::Trap(message)) => {
                tracing::warn!(error = %message, "query trapped; replacing the instance");
                self.instance = self.new_instance().ok();
                Err(message)
            }
        }
    }

    /// Handle one polled batch end to end; Err only when the store could not commit.
    fn process(&mut self, mut polled: Vec<Polled>) -> Result<(), String> {
        let mut commit = BatchCommit::default();
        // Indexes into `polled` of the events delivered, and the events themselves.
        let mut deliver: Vec<usize> = Vec::new();
        let mut batch: Vec<GuestEnvelope> = Vec::new();
        let mut batch_ids = HashSet::new();
        for (i, p) in polled.iter_mut().enumerate() {
            if let Ok((id, _)) = &p.event
                && (self.seen.contains(id) || !batch_ids.insert(*id))
            {
                tracing::debug!(topic = %p.topic, partition = p.record.partition, offset = p.record.offset, event = %uuid::Uuid::from_u128(*id), "skipping an event already applied");
                continue;
            }
            match &mut p.event {
                Err(error) => {
                    let error = format!("not a valid envelope: {error}");
                    tracing::warn!(topic = %p.topic, partition = p.record.partition, offset = p.record.offset, %error, "skipping a record that is not a valid envelope");
                    self.note_error(&format!("{}/{}/{}: {error}", p.topic, p.record.partition, p.record.offset));
                    commit.outbox.push(self.dead_letter(p, &error));
                }
                Ok((_, guest)) => {
                    if guest.as_ref().is_some_and(|g| self.patterns.iter().any(|pat| pat.matches(&g.event_type)))
                        && let Some(guest) = guest.take()
                    {
                        deliver.push(i);
                        batch.push(guest);
                    }
                }
            }
        }
        let handled = deliver.len() as u64;
        if !deliver.is_empty() {
            let batch: Arc<[GuestEnvelope]> = batch.into();
            match self.call_with_retries(&batch) {
                Ok(effects) => {
                    let effects = self.suppress(effects);
                    commit.state_writes = effects.state_writes;
                    commit.broadcasts = effects.broadcasts;
                    commit.outbox.extend(effects.publishes);
                    self.consecutive_dead_letters = 0;
                }
                Err(error) if deliver.len() == 1 => {
                    commit.outbox.push(self.fail_event(&polled[deliver[0]], &error));
                }
                Err(error) => {
                    tracing::info!(error = %error, events = deliver.len(), "batch failed; handling its events one by one");
                    self.one_by_one(&polled, &deliver, &batch)?;
                }
            }
        }
        for p in &polled {
            let next = p.record.offset + 1;
            let position = self.positions.entry((p.topic.clone(), p.record.partition)).or_insert(0);
            *position = (*position).max(next);
        }
        commit.offsets = self.positions.iter().map(|((t, p), n)| (t.clone(), *p, *n)).collect();
        self.commit(commit)?;
        self.remember(batch_ids);
        self.set_status(|s| s.processed += handled);
        tracing::debug!(records = polled.len(), handled, "batch committed");
        Ok(())
    }

    /// After a batch failed as a whole: each event alone, each committed alone.
    fn one_by_one(&mut self, polled: &[Polled], deliver: &[usize], batch: &[GuestEnvelope]) -> Result<(), String> {
        for (i, event) in deliver.iter().zip(batch) {
            let p = &polled[*i];
            let mut commit = BatchCommit::default();
            let one: Arc<[GuestEnvelope]> = Arc::new([event.clone()]);
            match self.call_with_retries(&one) {
                Ok(effects) => {
                    let effects = self.suppress(effects);
                    commit.state_writes = effects.state_writes;
                    commit.broadcasts = effects.broadcasts;
                    commit.outbox = effects.publishes;
                    self.consecutive_dead_letters = 0;
                }
                Err(error) => commit.outbox.push(self.fail_event(p, &error)),
            }
            commit.offsets.push((p.topic.clone(), p.record.partition, p.record.offset + 1));
            self.commit(commit)?;
        }
        Ok(())
    }

    /// A shadow keeps only its state; a replay does not broadcast again what was delivered.
    fn suppress(&self, mut effects: crate::runtime::Effects) -> crate::runtime::Effects {
        if self.mode == Mode::Shadow {
            effects.broadcasts.clear();
            effects.publishes.clear();
        } else if self.replay.is_some() {
            effects.broadcasts.clear();
        }
        effects
    }

    fn commit(&mut self, mut commit: BatchCommit) -> Result<(), String> {
        if self.mode == Mode::Shadow {
            // Not even dead letters: the live version answers for the stream.
            commit.outbox.clear();
            commit.broadcasts.clear();
        }
        if commit.is_empty() {
            return Ok(());
        }
        // With a shared fan-out log, broadcasts go out through the outbox too.
        let has_outbox = !commit.outbox.is_empty() || !commit.broadcasts.is_empty();
        let hub = &self.deps.hub;
        self.deps
            .store
            .commit_batch(&self.namespace, &commit, |fanout| hub.publish(fanout))
            .map_err(|e| e.to_string())?;
        if self.mode == Mode::Live {
            for (topic, partition, next) in &commit.offsets {
                self.deps.log.note_consumer_offset(&self.name, topic, *partition, *next);
            }
        }
        if has_outbox {
            self.deps.outbox.notify_one();
        }
        let offsets = self.offsets_view();
        self.set_status(|s| s.offsets = offsets);
        Ok(())
    }

    /// Call `handle`, retrying on a fresh instance; the last error if every attempt failed.
    fn call_with_retries(&mut self, batch: &Arc<[GuestEnvelope]>) -> Result<crate::runtime::Effects, String> {
        let attempts = self.manifest.limits.retries + 1;
        let mut last = String::new();
        for attempt in 0..attempts {
            if self.instance.is_none() {
                match self.new_instance() {
                    Ok(instance) => self.instance = Some(instance),
                    Err(e) => {
                        last = format!("instantiating: {e}");
                        continue;
                    }
                }
            }
            let instance = self.instance.as_mut().expect("instance present");
            let started = Instant::now();
            let result = instance.handle(batch, self.timeout);
            let micros = started.elapsed().as_micros() as u64;
            self.set_status(|s| {
                s.busy_micros += micros;
                s.batches += 1;
                s.avg_batch_micros = s.busy_micros / s.batches;
            });
            match result {
                Ok(effects) => return Ok(effects),
                Err(error) => {
                    last = match &error {
                        CallError::Failed { index: Some(i), message } => {
                            let at = batch
                                .get(*i as usize)
                                .map_or(String::new(), |e| format!(" at {}/{}/{}", e.topic, e.partition, e.offset));
                            format!("handle failed{at}: {message}")
                        }
                        other => other.to_string(),
                    };
                    tracing::warn!(attempt = attempt + 1, of = attempts, events = batch.len(), error = %last, "batch failed");
                    // Guest memory may be ahead of the committed state: start afresh.
                    self.instance = None;
                    if attempt + 1 < attempts {
                        std::thread::sleep(Duration::from_millis(20 << attempt.min(4)));
                    }
                }
            }
        }
        Err(last)
    }

    fn fail_event(&mut self, p: &Polled, error: &str) -> AppendItem {
        tracing::error!(topic = %p.topic, partition = p.record.partition, offset = p.record.offset, %error, "event sent to the dead-letter topic");
        self.note_error(&format!("{}/{}/{}: {error}", p.topic, p.record.partition, p.record.offset));
        self.dead_letter(p, error)
    }

    fn dead_letter(&mut self, p: &Polled, error: &str) -> AppendItem {
        self.consecutive_dead_letters += 1;
        self.set_status(|s| s.dead_letters += 1);
        let original = serde_json::from_slice::<serde_json::Value>(&p.record.payload)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&p.record.payload).into_owned()));
        let at = format!("owlery/dead-letter/{}/{}/{}/{}", self.name, p.topic, p.record.partition, p.record.offset);
        let event_id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, at.as_bytes());
        let envelope = Envelope {
            event_id,
            event_type: DEAD_LETTER_TYPE.to_owned(),
            timestamp: crate::envelope::now_rfc3339(),
            source: format!("plugin:{}", self.name),
            user_id: None,
            metadata: serde_json::Map::new(),
            data: serde_json::json!({
                "plugin": &*self.name,
                "error": error,
                "topic": p.topic,
                "partition": p.record.partition,
                "offset": p.record.offset,
                "event": original,
            }),
            extra: serde_json::Map::new(),
        };
        AppendItem { topic: DEAD_LETTER_TOPIC.to_owned(), key: event_id.to_string(), envelope }
    }
}

/// What a plugin gets for a stored record, and the event's id; `Err` if the record is not a
/// valid envelope. Reads the stored JSON once, keeping `data` and `metadata` as their text.
pub fn guest_from_record(topic: &str, record: &Record) -> Result<(u128, GuestEnvelope), String> {
    let (id, e) = crate::envelope::StoredEnvelope::parse(&record.payload)?;
    let guest = GuestEnvelope {
        event_id: id.to_string(),
        event_type: e.event_type.into_owned(),
        timestamp: e.timestamp.into_owned(),
        source: e.source.into_owned(),
        user_id: e.user_id.map(std::borrow::Cow::into_owned),
        metadata: e.metadata.map_or_else(|| "{}".to_owned(), |m| m.get().to_owned()),
        data: e.data.map_or_else(|| "null".to_owned(), |d| d.get().to_owned()),
        topic: topic.to_owned(),
        partition: record.partition,
        offset: record.offset,
    };
    Ok((id.as_u128(), guest))
}
