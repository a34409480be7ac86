//! Case 1: events/s through a plugin vs the same logic natively, from stored bytes (what
//! the runner does per event: decode, convert, call). Runs in this process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::BenchArgs;
use super::report::{Report, ratio};
use crate::envelope::Envelope;
use crate::log::Record;
use crate::plugins::runner::guest_from_record;
use crate::routing::Routing;
use crate::runtime::{CallLimits, Capabilities, InstanceContext, Runtime};
use crate::store::Store;

pub(super) fn dispatch(args: &BenchArgs, report: &mut Report) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let runtime = Runtime::new(&dir.path().join("cache"), Duration::from_secs(300))?;
    let store = Arc::new(Store::open(dir.path(), 1000, Duration::ZERO)?);
    let cx = InstanceContext {
        plugin: "bench".into(),
        namespace: "bench".into(),
        caps: Arc::new(Capabilities {
            broadcast: true,
            publish: Vec::new(),
            state: true,
            limits: CallLimits { memory: 256 << 20, ..CallLimits::default() },
            ..Capabilities::default()
        }),
        store,
        routing: Arc::new(Routing::default()),
        key: crate::keys::HostKey::from_secret(b"bench"),
        cancel: tokio_util::sync::CancellationToken::new(),
        interrupt: Default::default(),
    };
    let total = if args.quick { 20_000 } else { 1_000_000 };
    let batch = args.batch.max(1);
    let input = records(batch * 16);
    for (name, key) in [("noop", "noop"), ("analytics", "analytics")] {
        let wasm_rate = wasm_rate(args, &runtime, &cx, name, &input, total)?;
        let native_rate = native_rate(name == "analytics", &input, total);
        report.add(
            &format!("dispatch.{key}.wasm_events_per_sec"),
            &format!("dispatch {name}: wasm plugin, batch {batch}"),
            wasm_rate,
            "events/s",
            format!("{} of native", ratio(wasm_rate, native_rate)),
        );
        report.add(
            &format!("dispatch.{key}.wasm_ns_per_event"),
            &format!("dispatch {name}: wasm, per event"),
            1e9 / wasm_rate,
            "ns",
            String::new(),
        );
        report.add(
            &format!("dispatch.{key}.native_events_per_sec"),
            &format!("dispatch {name}: native Rust handler"),
            native_rate,
            "events/s",
            String::new(),
        );
    }
    // The JavaScript plugin (componentize-js), over presence events, when it is built.
    match super::wasm_path(&args.wasm_dir, "presence") {
        Ok(_) => {
            let input = presence_records(batch * 16);
            let rate = wasm_rate(args, &runtime, &cx, "presence", &input, total / 4)?;
            report.add(
                "dispatch.presence.wasm_events_per_sec",
                &format!("dispatch presence: JavaScript plugin, batch {batch}"),
                rate,
                "events/s",
                "componentize-js".into(),
            );
            report.add(
                "dispatch.presence.wasm_ns_per_event",
                "dispatch presence: JS, per event",
                1e9 / rate,
                "ns",
                "".into(),
            );
        }
        Err(missing) => println!("{:<58} {:>22}   {missing}", "dispatch presence: JavaScript plugin", "skipped"),
    }
    Ok(())
}

/// Presence events as the host publishes them: connects, joins, leaves and disconnects of
/// 200 users in 20 rooms.
fn presence_records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let (user, room) = (format!("user-{}", i % 200), format!("incident:{}", i % 20));
            let (event_type, data) = match (i / 200) % 4 {
                0 => ("user.connected", json!({"userId": user, "connectionId": format!("c{}", i % 200)})),
                1 => {
                    ("user.joined_room", json!({"userId": user, "connectionId": format!("c{}", i % 200), "room": room}))
                }
                2 => ("user.left_room", json!({"userId": user, "connectionId": format!("c{}", i % 200), "room": room})),
                _ => {
                    ("user.disconnected", json!({"userId": user, "connectionId": format!("c{}", i % 200), "rooms": []}))
                }
            };
            let envelope = Envelope::from_producer(
                json!({"eventType": event_type, "source": "owlery", "userId": user, "data": data}),
            )
            .expect("valid");
            Record { partition: 0, offset: i as u64, payload: envelope.to_bytes().into() }
        })
        .collect()
}

/// Events/s through plugin `name`, `--batch` events per `handle` call, until `total`.
fn wasm_rate(
    args: &BenchArgs,
    runtime: &Runtime,
    cx: &InstanceContext,
    name: &str,
    input: &[Record],
    total: usize,
) -> anyhow::Result<f64> {
    let wasm = super::read_wasm(args, name)?;
    let component = runtime.load(&wasm)?;
    let mut instance = component.instantiate(runtime, cx).map_err(|e| anyhow::anyhow!("{e}"))?;
    instance.init("{}", Duration::from_secs(5)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    let mut done = 0;
    while done < total {
        for chunk in input.chunks(args.batch.max(1)) {
            let guests: Arc<[_]> = chunk.iter().map(|r| guest_from_record("t", r).expect("valid").1).collect();
            instance.handle(&guests, Duration::from_secs(5)).map_err(|e| anyhow::anyhow!("{e}"))?;
            done += chunk.len();
        }
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

/// Events/s decoded natively, and counted as analytics counts them when `analytics`.
fn native_rate(analytics: bool, input: &[Record], total: usize) -> f64 {
    let mut counts = NativeCounts::default();
    let started = Instant::now();
    let mut done = 0;
    while done < total {
        for r in input {
            let envelope = Envelope::from_bytes(&r.payload).expect("valid");
            if analytics {
                counts.apply(&envelope);
            } else {
                std::hint::black_box(&envelope);
            }
            done += 1;
        }
    }
    std::hint::black_box(counts.total);
    done as f64 / started.elapsed().as_secs_f64()
}

/// Stored envelopes as the log holds them.
fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let severity = ["LOW", "HIGH", "CRITICAL"][i % 3];
            let event_type = ["incident.created", "incident.updated", "comment.added", "incident.resolved"][i % 4];
            let envelope = Envelope::from_producer(json!({
                "eventType": event_type,
                "source": "bench",
                "userId": format!("user-{}", i % 50),
                "data": {"id": i % 500, "severity": severity, "location": format!("site-{}", i % 20), "title": "Forklift blocking aisle 7"},
            }))
            .expect("valid");
            Record { partition: 0, offset: i as u64, payload: envelope.to_bytes().into() }
        })
        .collect()
}

/// The analytics plugin's logic, natively, for the comparison.
#[derive(Default)]
struct NativeCounts {
    total: u64,
    by_type: BTreeMap<String, u64>,
    by_source: BTreeMap<String, u64>,
    by_severity: BTreeMap<String, u64>,
    per_minute: BTreeMap<String, u64>,
    open: BTreeMap<String, String>,
}

impl NativeCounts {
    fn apply(&mut self, e: &Envelope) {
        self.total += 1;
        *self.by_type.entry(e.event_type.clone()).or_default() += 1;
        *self.by_source.entry(e.source.clone()).or_default() += 1;
        if let Some(minute) = e.timestamp.get(..16) {
            *self.per_minute.entry(minute.to_owned()).or_default() += 1;
        }
        // The plugin sees `data` as JSON text and parses it; so does this.
        let data: Value = serde_json::from_str(&e.data.to_string()).unwrap_or_default();
        if let Some(s) = data.get("severity").and_then(|s| s.as_str()) {
            *self.by_severity.entry(s.to_owned()).or_default() += 1;
        }
        let id = data.get("id").map(|v| v.to_string());
        match (e.event_type.as_str(), id) {
            ("incident.created", Some(id)) => {
                self.open.insert(id, data["severity"].as_str().unwrap_or("UNKNOWN").to_owned());
            }
            ("incident.resolved", Some(id)) => {
                self.open.remove(&id);
            }
            _ => {}
        }
    }
}
