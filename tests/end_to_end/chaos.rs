//! Crashes at random moments, per backend: `kill -9` of the host while events are published
//! and plugins are replayed, swapped, shadowed and promoted at the same time. Afterwards,
//! every acknowledged event is in the log, each plugin applied each event exactly once,
//! each broadcast is in the fan-out log once and in order, and no queue is stuck.
//!
//! The moments are drawn from a seed printed at the start; `OWLERY_CHAOS_SEED=N` runs the
//! same draw again.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::lifecycle::version_of;
use crate::support::{Host, event, shipped};
use owlery_testkit::IggyServer;

/// Crashes per run.
const CRASHES: usize = 4;
const WAIT: Duration = Duration::from_secs(60);

/// splitmix64: small, and the same numbers for the same seed everywhere.
struct Draw(AtomicU64);

impl Draw {
    fn new() -> Draw {
        let seed = std::env::var("OWLERY_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
        eprintln!("chaos seed: OWLERY_CHAOS_SEED={seed}");
        Draw(AtomicU64::new(seed))
    }

    fn next(&self) -> u64 {
        let mut z = self.0.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn millis(&self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.next() % (to - from))
    }
}

/// What the publishers and the operator share with the test while the host comes and goes.
struct Shared {
    /// The host's base URL (a new port after each start).
    base: RwLock<String>,
    http: reqwest::Client,
    acked: Mutex<HashSet<String>>,
    running: AtomicBool,
    draw: Draw,
}

impl Shared {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base.read().unwrap())
    }
}

/// Publish small batches of `incident.created` (broadcast to `all`) and `user.connected`
/// (broadcast to `presence`) until stopped, keeping the ids the host acknowledged.
async fn publish(shared: Arc<Shared>, publisher: u64) {
    let mut n = 0u64;
    while shared.running.load(Ordering::Relaxed) {
        n += 1;
        let batch: Vec<Value> = (0..5)
            .map(|i| {
                let mut e = if i % 2 == 0 {
                    event("incident.created", json!({"id": n * 10 + i, "severity": "LOW", "by": publisher}))
                } else {
                    event("user.connected", json!({"n": n}))
                };
                e["userId"] = json!(format!("user-{publisher}-{i}"));
                e
            })
            .collect();
        let sent = shared.http.post(shared.url("/api/events")).json(&batch).send().await;
        match sent {
            Ok(response) if response.status().as_u16() == 201 => {
                if let Ok(answer) = response.json::<Value>().await {
                    let mut acked = shared.acked.lock().unwrap();
                    for e in answer["events"].as_array().unwrap() {
                        acked.insert(e["eventId"].as_str().unwrap().to_owned());
                    }
                }
            }
            // Down (being killed, or starting again): try again in a moment.
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Replay, swap, shadow + promote, at random, on both plugins, until stopped. Whatever the
/// host answers (or whether it answers at all) is fine: a crash in the middle is the point.
async fn operate(shared: Arc<Shared>) {
    let mut version = 0;
    while shared.running.load(Ordering::Relaxed) {
        tokio::time::sleep(shared.draw.millis(50, 300)).await;
        let plugin = if shared.draw.next().is_multiple_of(2) { "analytics" } else { "ws-broadcast" };
        let (_, wasm, manifest) = shipped(plugin);
        let wasm = std::fs::read(wasm).unwrap();
        version += 1;
        let http = &shared.http;
        let _ = match shared.draw.next() % 3 {
            0 => http.post(shared.url(&format!("/api/plugins/{plugin}/replay"))).json(&json!({"from": 0})).send().await,
            1 => {
                http.put(shared.url(&format!("/api/plugins/{plugin}")))
                    .query(&[("manifest", manifest.as_str())])
                    .header("content-type", "application/wasm")
                    .body(version_of(&wasm, version))
                    .send()
                    .await
            }
            _ => {
                let _ = http
                    .post(shared.url(&format!("/api/plugins/{plugin}/shadow")))
                    .query(&[("manifest", manifest.as_str())])
                    .header("content-type", "application/wasm")
                    .body(version_of(&wasm, version))
                    .send()
                    .await;
                tokio::time::sleep(shared.draw.millis(50, 400)).await;
                http.post(shared.url(&format!("/api/plugins/{plugin}/promote?force=true")))
                    .json(&json!({}))
                    .send()
                    .await
            }
        };
    }
}

/// Wait until both plugins have read everything and the outbox (and on Iggy the spool) is
/// empty, with nothing set aside.
async fn settled(host: &Host) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, status) = host.get_available("/api/monitoring/iggy-status").await;
        let spool_empty = status.get("spool").is_none_or(|s| *s == json!({"pending": 0, "setAside": 0}));
        let outbox_empty = status["outbox"] == json!({"pending": 0, "setAside": 0});
        let mut caught_up = true;
        for plugin in ["analytics", "ws-broadcast"] {
            let status = host.plugin(plugin).await;
            caught_up &= status["lag"] == 0 && status["state"] == "running";
        }
        if spool_empty && outbox_empty && caught_up {
            return;
        }
        assert!(Instant::now() < deadline, "a queue is stuck: {status}\n{}", host.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn crash_at_random(mut host: Host) {
    let shared = Arc::new(Shared {
        base: RwLock::new(host.base.clone()),
        http: host.http.clone(),
        acked: Mutex::default(),
        running: AtomicBool::new(true),
        draw: Draw::new(),
    });
    let mut tasks: Vec<_> = (0..2).map(|p| tokio::spawn(publish(shared.clone(), p))).collect();
    tasks.push(tokio::spawn(operate(shared.clone())));
    for crash in 0..CRASHES {
        tokio::time::sleep(shared.draw.millis(300, 1500)).await;
        host.kill9();
        eprintln!("crash {crash}: killed with {} events acknowledged", shared.acked.lock().unwrap().len());
        tokio::time::sleep(shared.draw.millis(0, 300)).await;
        host.start();
        *shared.base.write().unwrap() = host.base.clone();
    }
    tokio::time::sleep(shared.draw.millis(300, 1000)).await;
    shared.running.store(false, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    settled(&host).await;

    // Every acknowledged event is in the log.
    let mut in_log = HashSet::new();
    let mut broadcastable = HashSet::new();
    for topic in ["incident-events", "presence-events"] {
        for record in host.topic_records(topic).await {
            let id = record["event"]["eventId"].as_str().unwrap().to_owned();
            if ["incident.created", "user.connected"].contains(&record["event"]["eventType"].as_str().unwrap()) {
                broadcastable.insert(id.clone());
            }
            in_log.insert(id);
        }
    }
    let acked = shared.acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "too few events were published to tell anything: {}", acked.len());
    let lost: Vec<_> = acked.difference(&in_log).collect();
    assert!(lost.is_empty(), "{} acknowledged events are not in the log, e.g. {:?}", lost.len(), lost.first());

    // Each plugin applied each event exactly once: analytics counts them.
    let counts = host.query("analytics", "").await;
    assert_eq!(counts["total"], in_log.len() as u64, "analytics counted an event twice or not at all");

    // Each broadcast is in the fan-out log once, in order: read it all from the start
    // (`since=-1`: everything retained).
    let mut client = host.ws("?rooms=all,presence&since=-1").await;
    let mut seen = BTreeSet::new();
    let mut last_offset = None;
    while let Some(frame) = client.next_json(Duration::from_secs(5)).await {
        if frame.get("offset").is_none() || frame.get("room").is_none() {
            eprintln!("control frame: {frame}");
            continue;
        }
        let offset = frame["offset"].as_u64().unwrap();
        assert!(last_offset < Some(offset), "fan-out out of order: {offset} after {last_offset:?}");
        last_offset = Some(offset);
        let id = frame["event"]["eventId"].as_str().unwrap().to_owned();
        assert!(seen.insert(id.clone()), "event {id} was broadcast twice (again at offset {offset}): {frame}");
        if seen.len() == broadcastable.len() {
            // Anything more would be a repeat.
            if let Some(extra) = client.next_event(Duration::from_secs(1)).await {
                panic!("a broadcast beyond every event's one: {extra}");
            }
            break;
        }
    }
    let missing: Vec<_> = broadcastable.iter().filter(|id| !seen.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} events were never broadcast (last offset {last_offset:?}), e.g. {:?}\n{}",
        missing.len(),
        broadcastable.len(),
        missing.first(),
        host.log_tail()
    );

    // And the host goes on.
    let (status, _) = host.post_events(&event("incident.created", json!({"id": 1}))).await;
    assert_eq!(status, 201);
    let frame = client.next_event(WAIT).await.expect("a new broadcast after the crashes");
    assert!(last_offset < frame["offset"].as_u64());
}

#[tokio::test(flavor = "multi_thread")]
async fn random_crashes_on_the_embedded_log_lose_nothing_and_repeat_nothing() {
    crash_at_random(Host::with_plugins(&[shipped("analytics"), shipped("ws-broadcast")])).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(owlery_skip_iggy, ignore = "SKIPPED: OWLERY_SKIP_IGGY=1")]
async fn random_crashes_on_iggy_lose_nothing_and_repeat_nothing() {
    let iggy = IggyServer::start(true);
    crash_at_random(Host::on_iggy(&iggy, &[shipped("analytics"), shipped("ws-broadcast")])).await;
}
