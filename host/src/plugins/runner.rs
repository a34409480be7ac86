//! The plugin runner: one thread per plugin that polls its subscribed partitions from its
//! own offsets, calls `handle` with batches, and commits the batch's state writes, new
//! offsets, broadcasts and publishes in one transaction. Failures are retried on a fresh
//! instance; an event that still fails goes to the dead-letter topic and the plugin moves on.

use std::collections::BTreeMap;
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

/// The topic failed events go to.
pub const DEAD_LETTER_TOPIC: &str = "dead-letters";
/// The event type of a dead letter.
pub const DEAD_LETTER_TYPE: &str = "owlery.dead_letter";
/// Consecutive dead letters after which a plugin is marked failed and stops.
const FAIL_AFTER_DEAD_LETTERS: u32 = 100;
/// How long an idle runner waits before looking again (new partitions, commands).
const IDLE_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Starting,
    Running,
    Failed,
    Stopped,
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
        }
    }
}

pub enum Command {
    Query { request: String, reply: oneshot::Sender<Result<String, String>> },
    Stop,
}

pub struct Runner {
    name: Arc<str>,
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
}

/// One record of a polled batch, decoded (or not).
struct Polled {
    topic: String,
    record: Record,
    envelope: Result<Envelope, String>,
}

impl Runner {
    pub fn new(
        name: &str,
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
        }
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

    /// The runner's thread body: returns when told to stop.
    pub fn run(mut self) {
        let span = tracing::info_span!("plugin", plugin = &*self.name);
        let _guard = span.enter();
        if let Err(message) = self.start() {
            tracing::error!(error = %message, "plugin failed to start");
            self.set_status(|s| {
                s.state = RunState::Failed;
                s.last_error = Some(message);
            });
            self.serve_commands_until_stopped();
            return;
        }
        self.set_status(|s| s.state = RunState::Running);
        tracing::info!(version = %&self.component.hash[..12], "plugin running");
        let mut changes = self.deps.log.changes();
        while !self.stopping {
            self.drain_commands();
            if self.stopping {
                break;
            }
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
            if self.consecutive_dead_letters >= FAIL_AFTER_DEAD_LETTERS {
                let message = format!("{FAIL_AFTER_DEAD_LETTERS} events in a row failed; plugin stopped");
                tracing::error!("{message}");
                self.set_status(|s| {
                    s.state = RunState::Failed;
                    s.last_error = Some(message);
                });
                self.serve_commands_until_stopped();
            }
        }
        self.set_status(|s| s.state = RunState::Stopped);
        tracing::info!("plugin stopped");
    }

    fn start(&mut self) -> Result<(), String> {
        self.instance = Some(self.new_instance().map_err(|e| format!("init: {e}"))?);
        let topics = self.subscribed_topics().map_err(|e| e.to_string())?;
        self.deps.block_on(self.deps.log.ensure_topics(&topics)).map_err(|e| e.to_string())?;
        self.reload_positions();
        Ok(())
    }

    fn new_instance(&self) -> Result<Instance, CallError> {
        let cx = InstanceContext {
            plugin: self.name.clone(),
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
        topics.retain(|t| t != DEAD_LETTER_TOPIC);
        Ok(topics)
    }

    /// Positions from the store; partitions never read start per the manifest.
    fn reload_positions(&mut self) {
        let stored = match self.deps.store.offsets(&self.name) {
            Ok(stored) => stored,
            Err(e) => {
                tracing::error!(error = %e, "reading offsets failed");
                return;
            }
        };
        self.positions.clear();
        for ((topic, partition), next) in stored {
            self.positions.insert((topic, partition), next);
        }
        self.refresh_partitions();
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
                let start = match self.manifest.subscribe.start {
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
        let max = self.manifest.limits.max_batch;
        let mut polled = Vec::new();
        let partitions: Vec<((String, u32), u64)> = self.positions.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let share = (max / partitions.len().max(1)).max(1);
        for ((topic, partition), from) in partitions {
            if polled.len() >= max {
                break;
            }
            let want = share.min(max - polled.len());
            for record in self.deps.block_on(self.deps.log.poll(&topic, partition, from, want))? {
                let envelope = Envelope::from_bytes(&record.payload).map_err(|e| e.to_string());
                polled.push(Polled { topic: topic.clone(), record, envelope });
            }
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

    fn serve_commands_until_stopped(&mut self) {
        while !self.stopping {
            match self.commands.blocking_recv() {
                Some(command) => self.command(command),
                None => self.stopping = true,
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Stop => self.stopping = true,
            Command::Query { request, reply } => {
                let answer = self.query(&request);
                let _ = reply.send(answer);
            }
        }
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
    fn process(&mut self, polled: Vec<Polled>) -> Result<(), String> {
        let mut commit = BatchCommit::default();
        let mut deliver: Vec<(usize, GuestEnvelope)> = Vec::new();
        for (i, p) in polled.iter().enumerate() {
            match &p.envelope {
                Err(error) => {
                    tracing::warn!(topic = %p.topic, partition = p.record.partition, offset = p.record.offset, %error, "skipping a record that is not a valid envelope");
                    self.note_error(&format!(
                        "{}/{}/{}: not a valid envelope: {error}",
                        p.topic, p.record.partition, p.record.offset
                    ));
                    commit.outbox.push(self.dead_letter(p, &format!("not a valid envelope: {error}")));
                }
                Ok(envelope) if self.patterns.iter().any(|pat| pat.matches(&envelope.event_type)) => {
                    deliver.push((i, to_guest(&p.topic, &p.record, envelope)));
                }
                Ok(_) => {}
            }
        }
        let handled = deliver.len() as u64;
        if !deliver.is_empty() {
            let batch: Vec<GuestEnvelope> = deliver.iter().map(|(_, e)| e.clone()).collect();
            match self.call_with_retries(&batch) {
                Ok(effects) => {
                    commit.state_writes = effects.state_writes;
                    commit.broadcasts = effects.broadcasts;
                    commit.outbox.extend(effects.publishes);
                    self.consecutive_dead_letters = 0;
                }
                Err(error) if deliver.len() == 1 => {
                    commit.outbox.push(self.fail_event(&polled[deliver[0].0], &error));
                }
                Err(error) => {
                    tracing::info!(error = %error, events = deliver.len(), "batch failed; handling its events one by one");
                    self.one_by_one(&polled, &deliver)?;
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
        self.set_status(|s| s.processed += handled);
        Ok(())
    }

    /// After a batch failed as a whole: each event alone, each committed alone.
    fn one_by_one(&mut self, polled: &[Polled], deliver: &[(usize, GuestEnvelope)]) -> Result<(), String> {
        for (i, event) in deliver {
            let p = &polled[*i];
            let mut commit = BatchCommit::default();
            match self.call_with_retries(std::slice::from_ref(event)) {
                Ok(effects) => {
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

    fn commit(&mut self, commit: BatchCommit) -> Result<(), String> {
        if commit.is_empty() {
            return Ok(());
        }
        let has_outbox = !commit.outbox.is_empty();
        let hub = &self.deps.hub;
        self.deps.store.commit_batch(&self.name, &commit, |fanout| hub.publish(fanout)).map_err(|e| e.to_string())?;
        if has_outbox {
            self.deps.outbox.notify_one();
        }
        let offsets = self.offsets_view();
        self.set_status(|s| s.offsets = offsets);
        Ok(())
    }

    /// Call `handle`, retrying on a fresh instance; the last error if every attempt failed.
    fn call_with_retries(&mut self, batch: &[GuestEnvelope]) -> Result<crate::runtime::Effects, String> {
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
        let original = match &p.envelope {
            Ok(envelope) => serde_json::to_value(envelope).unwrap_or_default(),
            Err(_) => serde_json::Value::String(String::from_utf8_lossy(&p.record.payload).into_owned()),
        };
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

fn to_guest(topic: &str, record: &Record, e: &Envelope) -> GuestEnvelope {
    GuestEnvelope {
        event_id: e.event_id.to_string(),
        event_type: e.event_type.clone(),
        timestamp: e.timestamp.clone(),
        source: e.source.clone(),
        user_id: e.user_id.clone(),
        metadata: serde_json::to_string(&e.metadata).unwrap_or_else(|_| "{}".into()),
        data: e.data.to_string(),
        topic: topic.to_owned(),
        partition: record.partition,
        offset: record.offset,
    }
}
