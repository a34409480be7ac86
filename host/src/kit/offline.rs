//! `owlery plugin test PLUGIN.wasm --events FILE.jsonl`: a plugin run offline, in the
//! host's own runtime with its manifest's limits and capabilities, over events from a file,
//! printing what it did for each: broadcasts, publishes, HTTP requests (shown, not sent),
//! state changes, and the dead letter
//! (with the error) of an event it still fails after its retries. Its state lives in memory.
//!
//! As in the host: events its manifest does not subscribe to are skipped; each event is
//! handled in a batch of its own (so the output is per event), retried `limits.retries`
//! times on a fresh instance; the batch's effects count only if `handle` succeeded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::envelope::{Envelope, check_json_shape};
use crate::plugins::manifest::{Manifest, ManifestError};
use crate::plugins::runner::guest_from_record;
use crate::routing::Routing;
use crate::runtime::{CallError, Instance, InstanceContext, LoadedComponent, Runtime, RuntimeError, StateError};

/// What `owlery plugin test` was asked.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// The plugin component.
    pub wasm: PathBuf,
    /// Events, one JSON envelope per line (as producers POST them).
    #[arg(long)]
    pub events: PathBuf,
    /// The manifest [default: the .toml beside the .wasm, else ./NAME.toml, else the defaults].
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// The plugin's name (in the ids it makes) [default: the file's stem].
    #[arg(long)]
    pub name: Option<String>,
    /// After the events, call `query` with this JSON object and print the answer.
    #[arg(long)]
    pub query: Option<String>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {error}", path.display())]
    Manifest { error: ManifestError, path: PathBuf },
    #[error("{}: {error}", path.display())]
    Load { error: RuntimeError, path: PathBuf },
    #[error("{file}:{line}: {message}")]
    Event { file: PathBuf, line: usize, message: String },
    #[error("init failed: {0}")]
    Init(CallError),
    #[error("--query: {0}")]
    Query(String),
    #[error("{0} of {1} events were dead-lettered")]
    DeadLetters(usize, usize),
}

/// The plugin's state, in memory.
#[derive(Default)]
struct MemoryState(Mutex<BTreeMap<String, Vec<u8>>>);

impl MemoryState {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl crate::runtime::StateView for MemoryState {
    fn get(&self, _namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.map().get(key).cloned())
    }

    fn scan(&self, _namespace: &str, prefix: &str, max_bytes: usize) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let mut bytes = 0;
        let map = self.map();
        let entries = map.range(prefix.to_owned()..).take_while(|(k, _)| k.starts_with(prefix));
        Ok(entries
            .take_while(|(k, v)| {
                bytes += k.len() + v.len();
                bytes <= max_bytes
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

/// One event's outcome, as printed.
struct Outcome {
    line: usize,
    event: Envelope,
    report: Value,
}

/// Run the test; an error when the plugin cannot be loaded or started, or when any event
/// was dead-lettered (so CI can use it). Call it from a blocking thread of a tokio runtime.
pub fn run(args: &TestArgs) -> Result<(), OfflineError> {
    let read = |path: &Path| std::fs::read(path).map_err(|source| OfflineError::Read { path: path.to_owned(), source });
    let wasm = read(&args.wasm)?;
    let events = read_events(&args.events, &read(&args.events)?)?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| args.wasm.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin").replace('_', "-"));
    let manifest = find_manifest(args, &name)?;

    // Compiled code is loaded from this cache without a check (wasmtime trusts what it
    // serialised), so it lives in a directory only this user can write, never in a shared
    // one such as /tmp where another user could plant native code.
    let scratch;
    let cache = match private_cache_dir() {
        Some(dir) => dir,
        None => {
            scratch =
                tempfile::tempdir().map_err(|source| OfflineError::Read { path: std::env::temp_dir(), source })?;
            scratch.path().to_owned()
        }
    };
    // The host's own compile limit, so a plugin that compiles here compiles there.
    let compile = Duration::from_millis(crate::config::Config::default().compile_timeout_ms);
    let loading = |error| OfflineError::Load { error, path: args.wasm.clone() };
    let runtime = Runtime::new(&cache, compile).map_err(loading)?;
    let component = runtime.load(&wasm).map_err(loading)?;
    let state = Arc::new(MemoryState::default());
    let routing = Arc::new(Routing::default());
    let cx = InstanceContext {
        plugin: name.as_str().into(),
        namespace: name.as_str().into(),
        caps: Arc::new(manifest.capabilities()),
        store: state.clone(),
        routing: routing.clone(),
        key: crate::keys::HostKey::from_secret(b"owlery plugin test"),
        cancel: Default::default(),
        interrupt: Default::default(),
    };
    let timeout = Duration::from_millis(manifest.limits.batch_timeout_ms);
    let mut tester =
        Tester { runtime: &runtime, component: &component, cx, manifest: &manifest, timeout, instance: None };
    tester.instance().map_err(OfflineError::Init)?;

    let patterns = manifest.event_patterns();
    let (mut dead, total) = (0, events.len());
    for (offset, (line, event)) in events.into_iter().enumerate() {
        let topic = routing.topic_for(&event.event_type).to_owned();
        let subscribed = patterns.iter().any(|p| p.matches(&event.event_type))
            && (manifest.subscribe.topics.is_empty() || manifest.subscribe.topics.contains(&topic));
        let report = if subscribed {
            let record = crate::log::Record { partition: 0, offset: offset as u64, payload: event.to_bytes().into() };
            let (_, guest) = guest_from_record(&topic, &record).expect("a validated envelope reads back");
            tester.handle(guest, &state)
        } else {
            json!({"outcome": "skipped", "reason": "its manifest does not subscribe to it"})
        };
        dead += usize::from(report["outcome"] == "dead-letter");
        print(&Outcome { line, event, report }, args.json);
    }
    if let Some(request) = &args.query {
        let parsed: Value = serde_json::from_str(request).map_err(|e| OfflineError::Query(e.to_string()))?;
        // The host hands `query` the query string as an object of strings: the same here,
        // so that a plugin tested with `{"n": 1}` does not meet `{"n": "1"}` in production.
        let strings = parsed.as_object().is_some_and(|o| o.values().all(Value::is_string));
        if !strings {
            return Err(OfflineError::Query(
                "must be a JSON object of strings, as the host passes the query string (?k=v is {\"k\": \"v\"})".into(),
            ));
        }
        let instance = tester.instance().map_err(OfflineError::Init)?;
        let answer = instance
            .query(request, Duration::from_millis(manifest.limits.query_timeout_ms))
            .map_err(|e| OfflineError::Query(e.to_string()))?;
        let answer: Value = serde_json::from_str(&answer).unwrap_or(Value::String(answer));
        if args.json {
            println!("{}", json!({"query": parsed, "answer": answer}));
        } else {
            println!("query {parsed} -> {answer}");
        }
    }
    if dead > 0 {
        return Err(OfflineError::DeadLetters(dead, total));
    }
    Ok(())
}

/// The manifest: `--manifest`, else the `.toml` beside the `.wasm` (where the host's plugins
/// directory keeps it), else `NAME.toml` in the working directory (a scaffolded project's
/// root, where `cargo build` leaves the `.wasm` deep in `target/`), else the defaults, said
/// so on stderr: the defaults subscribe to every event and grant no capability.
fn find_manifest(args: &TestArgs, name: &str) -> Result<Manifest, OfflineError> {
    let parse = |path: PathBuf, text: String| {
        Manifest::parse(&text).map_err(|error| OfflineError::Manifest { error, path: path.clone() })
    };
    if let Some(path) = &args.manifest {
        let text = std::fs::read_to_string(path).map_err(|source| OfflineError::Read { path: path.clone(), source })?;
        return parse(path.clone(), text);
    }
    for path in [args.wasm.with_extension("toml"), PathBuf::from(format!("{name}.toml"))] {
        if let Ok(text) = std::fs::read_to_string(&path) {
            eprintln!("using the manifest {}", path.display());
            return parse(path, text);
        }
    }
    eprintln!(
        "no manifest found ({} or ./{name}.toml; give one with --manifest): using the defaults, \
         every event and no capabilities",
        args.wasm.with_extension("toml").display()
    );
    Ok(Manifest::default())
}

/// `$XDG_CACHE_HOME/owlery/plugin-test` (or `~/.cache/...`), made private to this user
/// (0700; changing the mode succeeds only for its owner); `None` when there is none.
fn private_cache_dir() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    let owlery = base.join("owlery");
    let dir = owlery.join("plugin-test");
    std::fs::create_dir_all(&dir).ok()?;
    for path in [&owlery, &dir] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).ok()?;
    }
    Some(dir)
}

/// The events of a JSON-lines file, validated as the host validates a producer's (blank
/// lines and `#` comments skipped), with their line numbers.
fn read_events(path: &Path, bytes: &[u8]) -> Result<Vec<(usize, Envelope)>, OfflineError> {
    let text = String::from_utf8_lossy(bytes);
    let mut events = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let at = |message: String| OfflineError::Event { file: path.to_owned(), line: index + 1, message };
        check_json_shape(trimmed.as_bytes()).map_err(|e| at(e.to_string()))?;
        let value: Value = serde_json::from_str(trimmed).map_err(|e| at(format!("not JSON: {e}")))?;
        events.push((index + 1, Envelope::from_producer(value).map_err(|e| at(e.to_string()))?));
    }
    Ok(events)
}

/// The plugin under test: its instance (made again after a failure) and what it runs with.
struct Tester<'a> {
    runtime: &'a Runtime,
    component: &'a LoadedComponent,
    cx: InstanceContext,
    manifest: &'a Manifest,
    timeout: Duration,
    instance: Option<Instance>,
}

impl Tester<'_> {
    fn instance(&mut self) -> Result<&mut Instance, CallError> {
        if self.instance.is_none() {
            let mut instance = self.component.instantiate(self.runtime, &self.cx)?;
            instance.init(&self.manifest.config_json(), self.timeout)?;
            self.instance = Some(instance);
        }
        Ok(self.instance.as_mut().expect("made above"))
    }

    /// Handle one event as a batch of its own, with the host's retries; apply its state
    /// writes when it succeeds. What it did, or its dead letter.
    fn handle(&mut self, guest: crate::runtime::GuestEnvelope, state: &MemoryState) -> Value {
        let batch: Arc<[crate::runtime::GuestEnvelope]> = Arc::new([guest]);
        let mut last = String::new();
        for attempt in 0..=self.manifest.limits.retries {
            let timeout = self.timeout;
            let result = self.instance().and_then(|instance| instance.handle(&batch, timeout));
            match result {
                Ok(effects) => {
                    let mut map = state.map();
                    let writes: Vec<Value> = effects
                        .state_writes
                        .iter()
                        .map(|(key, value)| json!({"key": key, "value": value.as_deref().map(shown)}))
                        .collect();
                    for (key, value) in effects.state_writes {
                        match value {
                            Some(value) => map.insert(key, value),
                            None => map.remove(&key),
                        };
                    }
                    let broadcasts: Vec<Value> = effects
                        .broadcasts
                        .iter()
                        .map(|b| json!({"room": b.room, "payload": shown(b.payload.as_bytes())}))
                        .collect();
                    let publishes: Vec<Value> = effects
                        .publishes
                        .iter()
                        .map(|p| json!({"eventType": p.envelope.event_type, "topic": p.topic, "data": p.envelope.data}))
                        .collect();
                    // Shown, never sent: `plugin test` touches nothing outside.
                    let http: Vec<Value> = effects
                        .http
                        .iter()
                        .map(|r| json!({"method": r.method, "url": r.url, "idempotencyKey": r.id, "body": shown(&r.body)}))
                        .collect();
                    return json!({"outcome": "handled", "attempts": attempt + 1, "broadcasts": broadcasts,
                                  "publishes": publishes, "http": http, "state": writes});
                }
                Err(error) => {
                    // As in the host: the instance is thrown away and a fresh one retries.
                    self.instance = None;
                    last = error.to_string();
                }
            }
        }
        json!({"outcome": "dead-letter", "error": last, "attempts": self.manifest.limits.retries + 1})
    }
}

/// Bytes as JSON when they are, else as text, else their length.
fn shown(bytes: &[u8]) -> Value {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => value,
        Err(_) => match std::str::from_utf8(bytes) {
            Ok(text) => Value::String(text.to_owned()),
            Err(_) => json!({"bytes": bytes.len()}),
        },
    }
}

fn print(outcome: &Outcome, as_json: bool) {
    let Outcome { line, event, report } = outcome;
    if as_json {
        let mut object = json!({"line": line, "eventId": event.event_id, "eventType": event.event_type});
        if let (Some(object), Some(report)) = (object.as_object_mut(), report.as_object()) {
            object.extend(report.clone());
        }
        println!("{object}");
        return;
    }
    println!("line {line}: {} {}", event.event_type, event.event_id);
    match report["outcome"].as_str() {
        Some("handled") => {
            let list = |key: &str| report[key].as_array().cloned().unwrap_or_default();
            for b in list("broadcasts") {
                println!("  broadcast  room {}  {}", b["room"].as_str().unwrap_or_default(), b["payload"]);
            }
            for p in list("publishes") {
                println!(
                    "  publish    {} -> {}  {}",
                    p["eventType"].as_str().unwrap_or_default(),
                    p["topic"],
                    p["data"]
                );
            }
            for r in list("http") {
                println!(
                    "  http       {} {}  {}  (not sent)",
                    r["method"].as_str().unwrap_or_default(),
                    r["url"].as_str().unwrap_or_default(),
                    r["body"]
                );
            }
            for s in list("state") {
                match &s["value"] {
                    Value::Null => println!("  state      {} deleted", s["key"].as_str().unwrap_or_default()),
                    value => println!("  state      {} = {value}", s["key"].as_str().unwrap_or_default()),
                }
            }
            if report["attempts"] != 1 {
                println!("  (handled on attempt {})", report["attempts"]);
            }
        }
        Some("dead-letter") => println!(
            "  DEAD LETTER after {} attempts: {}",
            report["attempts"],
            report["error"].as_str().unwrap_or_default()
        ),
        _ => println!("  skipped: {}", report["reason"].as_str().unwrap_or_default()),
    }
}
