//! The plugin lifecycle: hot swap under load, refusing bad components, replay from zero,
//! shadow and promote, remove and re-add, pause and resume, and the `owlery plugins` CLI.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::{Host, event, guests, reporter_5_update, reporter_5_updates, shipped};

const WAIT: Duration = Duration::from_secs(30);

/// The same component with a custom section appended: a new version (new hash) with the
/// same behaviour.
pub(crate) fn version_of(wasm: &[u8], n: u32) -> Vec<u8> {
    let name = b"owlery-test-version";
    let payload = n.to_le_bytes();
    let mut body = vec![name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(&payload);
    let mut out = wasm.to_vec();
    out.push(0); // custom section
    let mut size = body.len() as u32;
    loop {
        let byte = (size & 0x7f) as u8;
        size >>= 7;
        if size == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(&body);
    out
}

fn hash(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn analytics_manifest() -> String {
    shipped("analytics").2
}

async fn put(host: &Host, name: &str, wasm: Vec<u8>, manifest: Option<&str>) -> (u16, Value) {
    let response = host.upload(name, wasm, manifest).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post(host: &Host, path: &str, body: Value) -> (u16, Value) {
    let response = host.http.post(host.url(path)).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn wait_for_version(host: &Host, name: &str, version: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = host.plugin(name).await;
        if status["version"] == version {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never ran version {version}: {status}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Replace by writing the file into the watched directory, the documented way.
fn drop_into(dir: &Path, name: &str, wasm: &[u8]) {
    let tmp = dir.join(format!(".{name}.wasm.tmp"));
    std::fs::write(&tmp, wasm).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{name}.wasm"))).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn replacing_analytics_under_load_counts_every_event_exactly_once() {
    let host = Host::with_plugins(&[shipped("analytics")]);
    let original = std::fs::read(guests::ANALYTICS).unwrap();
    let publisher = {
        let (http, url) = (host.http.clone(), host.url("/api/events"));
        tokio::spawn(async move {
            for round in 0..40 {
                let batch: Vec<_> = (0..25).map(|i| event("incident.updated", json!({"id": round * 25 + i}))).collect();
                let response = http.post(&url).json(&batch).send().await.unwrap();
                assert_eq!(response.status().as_u16(), 201);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let plugins_dir = host.dir.path().join("plugins");
    let mut last = String::new();
    for n in 1..=6 {
        let wasm = version_of(&original, n);
        last = hash(&wasm);
        if n % 2 == 0 {
            drop_into(&plugins_dir, "analytics", &wasm);
        } else {
            let (status, body) = put(&host, "analytics", wasm, None).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["installed"], "swapped");
        }
        wait_for_version(&host, "analytics", &last).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    publisher.await.unwrap();
    wait_for_version(&host, "analytics", &last).await;
    host.caught_up("analytics").await;
    let counts = host.query("analytics", "").await;
    assert_eq!(counts["total"], 1000, "every event counted exactly once across six swaps: {counts}");
    assert_eq!(counts["byEventType"]["incident.updated"], 1000);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_component_is_refused_and_the_old_version_keeps_running() {
    let host = Host::with_plugins(&[shipped("analytics")]);
    let before = host.plugin("analytics").await["version"].clone();

    let (status, body) = put(&host, "analytics", b"definitely not wasm".to_vec(), None).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "wasm");
    assert!(body["error"].as_str().unwrap().contains("not a valid component"), "{body}");

    let wrong = std::fs::read(guests::WRONG_WORLD).unwrap();
    let (status, body) = put(&host, "analytics", wrong.clone(), None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("owlery:plugin world"), "{body}");

    let good = std::fs::read(guests::ANALYTICS).unwrap();
    let (status, body) = put(&host, "analytics", good, Some("[limits]\nmemory_mb = 0")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "manifest");

    let (status, body) = put(&host, "not a name", vec![0], None).await;
    assert!(status == 400 || status == 404, "{status} {body}");

    // A broken file dropped into the directory: the error shows, the old version runs on.
    drop_into(&host.dir.path().join("plugins"), "analytics", &wrong);
    let deadline = Instant::now() + WAIT;
    loop {
        let status = host.plugin("analytics").await;
        if status["lastError"].as_str().is_some_and(|e| e.contains("load failed")) {
            break;
        }
        assert!(Instant::now() < deadline, "the load error never showed: {status}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(host.plugin("analytics").await["version"], before);
    assert_eq!(host.post_events(&event("incident.created", json!({"id": 1}))).await.0, 201);
    host.caught_up("analytics").await;
    assert_eq!(host.query("analytics", "").await["total"], 1);
    assert_eq!(host.plugin("analytics").await["state"], "running");
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_from_zero_rebuilds_the_same_state_without_broadcasting_again() {
    let host = Host::with_shipped_plugins();
    // Forty incidents, each with its lifecycle; one reporter per incident keeps its events
    // in one partition, in order (partitions are independent of each other).
    let mut batch = Vec::new();
    for k in 0..40 {
        let with_user = |mut e: Value| {
            e["userId"] = json!(format!("reporter-{k}"));
            e
        };
        let severity = ["LOW", "HIGH"][k % 2];
        batch.push(with_user(event(
            "incident.created",
            json!({"id": k, "severity": severity, "location": format!("l{}", k % 3)}),
        )));
        batch.push(with_user(event("incident.updated", json!({"id": k, "status": "investigating"}))));
        batch.push(with_user(event("comment.added", json!({"incidentId": k, "text": "seen"}))));
        if k % 3 == 0 {
            batch.push(with_user(event("incident.resolved", json!({"id": k}))));
        }
        batch.push(with_user(event("user.connected", json!({}))));
    }
    assert_eq!(host.post_events(&json!(batch)).await.0, 201);
    host.caught_up("ws-broadcast").await;
    host.caught_up("alerts").await;
    host.caught_up("analytics").await;
    let before = host.query("analytics", "").await;
    let mut client = host.ws("?rooms=incident:3").await;

    for plugin in ["analytics", "ws-broadcast"] {
        let (status, body) = post(&host, &format!("/api/plugins/{plugin}/replay"), json!({"from": 0})).await;
        assert_eq!(status, 202, "{body}");
        assert!(body["replay"]["total"].as_u64().unwrap() > 0, "{body}");
    }
    host.caught_up("analytics").await;
    host.caught_up("ws-broadcast").await;
    let after = host.query("analytics", "").await;
    assert_eq!(after, before, "replaying from zero rebuilds exactly the same state");
    let status = host.plugin("analytics").await;
    assert_eq!(status["state"], "running");
    assert_eq!(status["replay"]["done"], status["replay"]["total"], "{status}");
    assert!(status["replay"]["finishedAt"].is_string(), "{status}");

    // Nothing was broadcast again: the next frame is a new event.
    host.post_events(&event("incident.updated", json!({"id": 3, "marker": "after-replay"}))).await;
    let frame = client.next_in_room("incident:3", WAIT).await.unwrap();
    assert_eq!(frame["event"]["data"]["marker"], "after-replay", "{frame}");

    let (status, body) = post(&host, "/api/plugins/analytics/replay", json!({"from": 7})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(&host, "/api/plugins/analytics/replay", json!({"timestamp": "yesterday"})).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "timestamp");
    let (status, _) = post(&host, "/api/plugins/nope/replay", json!({"from": 0})).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_from_a_timestamp_counts_what_was_stamped_from_then_and_one_in_the_future_finishes_at_once() {
    let host = Host::with_plugins(&[shipped("analytics")]);
    let cut = "2026-03-01T12:00:00Z";
    let incident = |id: String, severity: &str, source: &str, timestamp: String| {
        json!({"eventType": "incident.created", "source": source, "timestamp": timestamp,
               "data": {"id": id, "severity": severity}})
    };
    // Thirty stamped before the cut, then one at it and twenty after, posted in that order:
    // in each partition the events before the cut come first (a replay by timestamp starts
    // each partition at its first event stamped at or after the cut).
    let before: Vec<Value> =
        (0..30).map(|i| incident(format!("b{i}"), "LOW", "before", format!("2026-03-01T11:{i:02}:00Z"))).collect();
    let mut after = vec![incident("c0".into(), "HIGH", "at-cut", cut.into())];
    after.extend((0..20).map(|i| incident(format!("a{i}"), "HIGH", "after", format!("2026-03-01T12:05:{i:02}Z"))));
    assert_eq!(host.post_events(&json!(before)).await.0, 201);
    assert_eq!(host.post_events(&json!(after)).await.0, 201);
    host.caught_up("analytics").await;
    assert_eq!(host.query("analytics", "").await["total"], 51);

    let (status, body) = host.post_json("/api/plugins/analytics/replay", &json!({"timestamp": cut})).await;
    assert_eq!(status, 202, "{body}");
    // Exactly the events from the cut on: a start past a partition's end must not wrap.
    assert_eq!(body["replay"]["total"], 21, "{body}");
    host.caught_up("analytics").await;
    let status = host.plugin("analytics").await;
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["replay"]["done"], status["replay"]["total"], "{status}");
    assert_eq!(status["replay"]["total"], 21, "{status}");
    assert!(status["replay"]["finishedAt"].is_string(), "{status}");
    // The state was dropped and rebuilt from the cut on: nothing of what came before.
    let counts = host.query("analytics", "").await;
    assert_eq!(counts["total"], 21, "{counts}");
    assert_eq!(counts["bySource"], json!({"at-cut": 1, "after": 20}));
    assert_eq!(counts["bySeverity"], json!({"HIGH": 21}));
    assert_eq!(counts["openBySeverity"], json!({"HIGH": 21}));
    assert_eq!(counts["perMinute"], json!({"2026-03-01T12:00": 1, "2026-03-01T12:05": 20}));

    // After everything in the log: nothing to read, so it is over at once, with empty
    // state, and the next event is counted.
    let future = json!({"timestamp": "2099-01-01T00:00:00Z"});
    let (status, body) = host.post_json("/api/plugins/analytics/replay", &future).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["replay"]["total"], 0, "{body}");
    host.caught_up("analytics").await;
    let status = host.plugin("analytics").await;
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["replay"]["total"], 0, "{status}");
    assert_eq!(status["replay"]["done"], 0, "{status}");
    assert!(status["replay"]["finishedAt"].is_string(), "{status}");
    assert_eq!(host.query("analytics", "").await["total"], 0);
    assert_eq!(host.post_events(&event("incident.updated", json!({"id": "a1"}))).await.0, 201);
    host.caught_up("analytics").await;
    assert_eq!(host.query("analytics", "").await["total"], 1, "the replay left it reading");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shadow_catches_up_and_is_promoted_without_a_gap() {
    let mut host = Host::with_plugins(&[shipped("analytics")]);
    let batch: Vec<_> = (0..100).map(|i| event("incident.created", json!({"id": i, "severity": "LOW"}))).collect();
    assert_eq!(host.post_events(&json!(batch)).await.0, 201);
    host.caught_up("analytics").await;
    let (status, _) = post(&host, "/api/plugins/analytics/promote", json!({})).await;
    assert_eq!(status, 409, "no shadow to promote");

    // The candidate: a plugin that answers {"count": n}, easy to tell from analytics.
    let candidate = std::fs::read(guests::MISBEHAVE).unwrap();
    let manifest = "[subscribe]\ntopics = [\"incident-events\"]\n[config]\nmode = \"error\"\n";
    let response = host
        .http
        .post(host.url("/api/plugins/analytics/shadow"))
        .query(&[("manifest", manifest)])
        .header("content-type", "application/wasm")
        .body(candidate.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let deadline = Instant::now() + WAIT;
    loop {
        let status = host.plugin("analytics").await;
        if status["shadow"]["caughtUp"] == true {
            assert_eq!(status["shadow"]["version"], hash(&candidate));
            assert_eq!(status["version"], hash(&std::fs::read(guests::ANALYTICS).unwrap()));
            break;
        }
        assert!(Instant::now() < deadline, "the shadow never caught up: {status}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The live version answers while the shadow runs.
    assert_eq!(host.query("analytics", "").await["total"], 100);

    let queries = {
        let (http, url) = (host.http.clone(), host.url("/api/plugins/analytics/query"));
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..60 {
                let response = http.get(&url).send().await.unwrap();
                answers.push((response.status().as_u16(), response.json::<Value>().await.unwrap()));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            answers
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (status, body) = post(&host, "/api/plugins/analytics/promote", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], hash(&candidate));
    assert!(body["shadow"].is_null());
    for (status, answer) in queries.await.unwrap() {
        assert_eq!(status, 200, "a query failed during the promotion: {answer}");
        assert!(answer["total"] == 100 || answer["count"] == 100, "an answer from neither version: {answer}");
    }
    assert_eq!(host.query("analytics", "").await, json!({"count": 100}));
    host.post_events(&event("incident.created", json!({"id": 1000}))).await;
    host.caught_up("analytics").await;
    assert_eq!(host.query("analytics", "").await, json!({"count": 101}));

    // The promoted version is what the host runs after a restart.
    host.stop();
    host.start();
    assert_eq!(host.plugin("analytics").await["version"], hash(&candidate));
    assert_eq!(host.query("analytics", "").await, json!({"count": 101}));
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_and_re_adding_a_plugin_resumes_from_its_offsets() {
    let host = Host::with_plugins(&[shipped("analytics")]);
    let wasm = std::fs::read(guests::ANALYTICS).unwrap();
    let manifest = analytics_manifest();
    let publish = |n: usize, from: usize| {
        let batch: Vec<_> = (from..from + n).map(|i| event("incident.updated", json!({"id": i}))).collect();
        json!(batch)
    };
    assert_eq!(host.post_events(&publish(30, 0)).await.0, 201);
    host.caught_up("analytics").await;

    let response = host.http.delete(host.url("/api/plugins/analytics")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(host.get("/api/plugins/analytics").await.0, 404);
    assert!(!host.dir.path().join("plugins/analytics.wasm").exists());
    assert_eq!(host.post_events(&publish(20, 30)).await.0, 201);

    let (status, body) = put(&host, "analytics", wasm.clone(), Some(&manifest)).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["installed"], "started");
    host.caught_up("analytics").await;
    assert_eq!(host.plugin("analytics").await["processed"], 20, "only the events it missed");
    assert_eq!(host.query("analytics", "").await["total"], 50);

    // Removing the file stops it too; putting it back resumes.
    std::fs::remove_file(host.dir.path().join("plugins/analytics.wasm")).unwrap();
    let deadline = Instant::now() + WAIT;
    while host.get("/api/plugins/analytics").await.0 != 404 {
        assert!(Instant::now() < deadline, "removing the file did not stop the plugin");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(host.post_events(&publish(5, 50)).await.0, 201);
    drop_into(&host.dir.path().join("plugins"), "analytics", &wasm);
    let deadline = Instant::now() + WAIT;
    while host.get("/api/plugins/analytics").await.0 != 200 {
        assert!(Instant::now() < deadline, "re-adding the file did not start the plugin");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    host.caught_up("analytics").await;
    assert_eq!(host.query("analytics", "").await["total"], 55);

    // Purging forgets offsets and state: it starts over.
    let response = host.http.delete(host.url("/api/plugins/analytics?purge=true")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (status, _) = put(&host, "analytics", wasm, Some(&manifest)).await;
    assert_eq!(status, 201);
    host.caught_up("analytics").await;
    assert_eq!(host.plugin("analytics").await["processed"], 55);
    assert_eq!(host.query("analytics", "").await["total"], 55);
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_and_resume_from_the_cli() {
    let host = Host::with_plugins(&[shipped("analytics")]);
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_owlery"))
            .arg("plugins")
            .args(args)
            .args(["--url", &host.base])
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&["pause", "analytics"]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["state"], "paused");
    assert_eq!(host.post_events(&json!([event("a.b", json!({})), event("a.c", json!({}))])).await.0, 201);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = host.plugin("analytics").await;
    assert_eq!(status["state"], "paused");
    assert_eq!(status["lag"], 2, "a paused plugin reads nothing");

    let (ok, _, err) = cli(&["resume", "analytics"]);
    assert!(ok, "{err}");
    host.caught_up("analytics").await;
    assert_eq!(host.query("analytics", "").await["total"], 2);

    let (ok, out, err) = cli(&["--json", "list"]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["plugins"][0]["name"], "analytics");
    let (ok, _, err) = cli(&["pause", "nope"]);
    assert!(!ok);
    assert!(err.contains("no plugin named"), "{err}");

    // Upload from a file beside its manifest, then remove.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(guests::MISBEHAVE, dir.path().join("counter.wasm")).unwrap();
    std::fs::write(dir.path().join("counter.toml"), "[config]\nmode = \"error\"\n").unwrap();
    let (ok, out, err) = cli(&["upload", dir.path().join("counter.wasm").to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["installed"], "started");
    host.caught_up("counter").await;
    assert_eq!(host.query("counter", "").await["count"], 2);
    let (ok, _, err) = cli(&["remove", "counter", "--purge"]);
    assert!(ok, "{err}");
    assert_eq!(host.get("/api/plugins/counter").await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_still_broadcasts_what_the_plugin_had_not_handled() {
    let host = Host::with_plugins(&[shipped("ws-broadcast")]);
    let mut client = host.ws("?rooms=incident:8").await;
    let update = |marker: &str| {
        let mut e = event("incident.updated", json!({"id": 8, "marker": marker}));
        e["userId"] = json!("reporter-8");
        e
    };
    host.post_events(&update("handled")).await;
    let frame = client.next_in_room("incident:8", WAIT).await.unwrap();
    assert_eq!(frame["event"]["data"]["marker"], "handled");

    // Paused, it does not handle the next one; then it is replayed from zero.
    assert_eq!(post(&host, "/api/plugins/ws-broadcast/pause", json!({})).await.0, 200);
    host.post_events(&update("while-paused")).await;
    let (status, body) = post(&host, "/api/plugins/ws-broadcast/replay", json!({"from": 0})).await;
    assert_eq!(status, 202, "{body}");
    if host.plugin("ws-broadcast").await["state"] == "paused" {
        assert_eq!(post(&host, "/api/plugins/ws-broadcast/resume", json!({})).await.0, 200);
    }
    host.caught_up("ws-broadcast").await;
    // The handled one is not sent again; the one it never handled is sent now, once.
    let frame = client.next_in_room("incident:8", WAIT).await.expect("the unhandled event is broadcast");
    assert_eq!(frame["event"]["data"]["marker"], "while-paused", "{frame}");
    host.post_events(&update("after")).await;
    let frame = client.next_in_room("incident:8", WAIT).await.unwrap();
    assert_eq!(frame["event"]["data"]["marker"], "after", "{frame}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_promoted_shadow_never_skips_what_live_had_not_handled() {
    let host = Host::with_plugins(&[shipped("alerts")]);
    // Live is paused: it has not handled the critical incident when the shadow starts.
    assert_eq!(post(&host, "/api/plugins/alerts/pause", json!({})).await.0, 200);
    let cause = uuid::Uuid::new_v4().to_string();
    let incident = json!({"eventId": cause, "eventType": "incident.created", "source": "test",
                          "data": {"id": 11, "severity": "CRITICAL"}});
    assert_eq!(host.post_events(&incident).await.0, 201);
    let (_, wasm, manifest) = shipped("alerts");
    let response = host
        .http
        .post(host.url("/api/plugins/alerts/shadow"))
        .query(&[("manifest", manifest.as_str())])
        .header("content-type", "application/wasm")
        .body(std::fs::read(wasm).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    // The shadow reads no further than live has handled: nothing, here.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = host.plugin("alerts").await;
    assert_eq!(status["shadow"]["processed"], 0, "the shadow went ahead of live: {status}");

    // Promoted (forced: it lags), then resumed: the incident is handled live, its alert
    // published, not dropped with the shadow's output.
    let (code, body) = post(&host, "/api/plugins/alerts/promote?force=true", json!({})).await;
    assert_eq!(code, 200, "{body}");
    if host.plugin("alerts").await["state"] == "paused" {
        assert_eq!(post(&host, "/api/plugins/alerts/resume", json!({})).await.0, 200);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let alerts = host.topic_records("alert-events").await;
        if alerts.iter().any(|r| r["event"]["metadata"]["causationId"] == cause.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "the alert for the incident live had not handled was never published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A replay asked for during a replay, and a shadow promoted while live is replaying, keep
/// quiet everything live had broadcast before the first replay: no client sees an event
/// again. (Both used to take live's position in the replay under way for what it had
/// handled, and broadcast again everything between there and the replay's target.)
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_or_a_promotion_during_a_replay_broadcasts_nothing_again() {
    let host = Host::with_plugins(&[shipped("ws-broadcast")]);
    for _ in 0..4 {
        assert_eq!(host.post_events(&json!(reporter_5_updates(5000))).await.0, 201);
    }
    host.caught_up("ws-broadcast").await;
    let mut client = host.ws("?rooms=incident:5").await;
    let marker = |n: &str| reporter_5_update(json!(n));
    let replay = || post(&host, "/api/plugins/ws-broadcast/replay", json!({"from": 0}));

    // A replay, and another at once, while the first is under way.
    assert_eq!(replay().await.0, 202);
    assert_eq!(replay().await.0, 202);
    host.caught_up("ws-broadcast").await;
    assert_eq!(host.post_events(&marker("first")).await.0, 201);
    let frame = client.next_in_room("incident:5", WAIT).await.unwrap();
    assert_eq!(frame["event"]["data"]["n"], "first", "the second replay broadcast history again: {frame}");

    // A replay, paused under way; a shadow (reading no further than live's position) is
    // promoted (forced: it lags), then resumed.
    assert_eq!(replay().await.0, 202);
    assert_eq!(post(&host, "/api/plugins/ws-broadcast/pause", json!({})).await.0, 200);
    let (_, wasm, manifest) = shipped("ws-broadcast");
    let response = host
        .http
        .post(host.url("/api/plugins/ws-broadcast/shadow"))
        .query(&[("manifest", manifest.as_str())])
        .header("content-type", "application/wasm")
        .body(version_of(&std::fs::read(wasm).unwrap(), 1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, body) = post(&host, "/api/plugins/ws-broadcast/promote?force=true", json!({})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(post(&host, "/api/plugins/ws-broadcast/resume", json!({})).await.0, 200);
    host.caught_up("ws-broadcast").await;
    assert_eq!(host.post_events(&marker("second")).await.0, 201);
    let frame = client.next_in_room("incident:5", WAIT).await.unwrap();
    assert_eq!(frame["event"]["data"]["n"], "second", "the promoted shadow broadcast history again: {frame}");
}

/// Shadow uploads at the same moment: one shadow is left, and nothing else writes into its
/// key space (an orphaned runner counting beside it would make its count wrong).
#[tokio::test(flavor = "multi_thread")]
async fn shadow_uploads_at_the_same_moment_leave_one_shadow_and_no_orphan() {
    let host = Host::with_plugins(&[shipped("analytics")]);
    let batch: Vec<_> = (0..2000).map(|i| event("incident.created", json!({"id": i, "severity": "LOW"}))).collect();
    assert_eq!(host.post_events(&json!(batch)).await.0, 201);
    host.caught_up("analytics").await;

    let candidate = std::fs::read(guests::MISBEHAVE).unwrap();
    let manifest = "[subscribe]\ntopics = [\"incident-events\"]\n[config]\nmode = \"error\"\n";
    let uploads = (0..4).map(|n| {
        host.http
            .post(host.url("/api/plugins/analytics/shadow"))
            .query(&[("manifest", manifest)])
            .header("content-type", "application/wasm")
            .body(version_of(&candidate, n))
            .send()
    });
    for response in futures_util::future::join_all(uploads).await {
        assert_eq!(response.unwrap().status().as_u16(), 201);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let status = host.plugin("analytics").await;
        if status["shadow"]["caughtUp"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "the shadow never caught up: {status}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Time for an orphan, if there were one, to count on.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, body) = post(&host, "/api/plugins/analytics/promote", json!({})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(host.query("analytics", "").await, json!({"count": 2000}), "each event counted once by one shadow");
    host.post_events(&event("incident.created", json!({"id": 1}))).await;
    host.caught_up("analytics").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(host.query("analytics", "").await, json!({"count": 2001}));
}

/// A plugin catching up reads its next batch while it handles one (`poll::ReadAhead`).
/// What was read ahead is used only for exactly the positions it was read for: a replay, a
/// pause and a swap landing in the middle of the catch-up still count every event once.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_catching_up_reads_ahead_and_commands_in_between_still_count_every_event_once() {
    let host = Host::with_plugins(&[analytics_in_small_batches()]);
    catch_up_with_commands_in_between(&host, async {}).await;
}

/// Analytics reading 16 events at a time: a catch-up takes hundreds of batches, so
/// commands sent during one land inside it.
pub(crate) fn analytics_in_small_batches() -> (String, std::path::PathBuf, String) {
    let (name, wasm, manifest) = shipped("analytics");
    let manifest = manifest.replace("max_batch = 512", "max_batch = 16");
    assert!(manifest.contains("max_batch = 16"));
    (name, wasm, manifest)
}

/// Publish 12,000 events to a paused analytics (`analytics_in_small_batches`), wait for
/// `published` (on Iggy: until they left the spool), resume it, and replay, pause, resume
/// and swap it while it catches up; every event is counted once, and batches were read
/// ahead.
pub(crate) async fn catch_up_with_commands_in_between(host: &Host, published: impl std::future::Future<Output = ()>) {
    host.caught_up("analytics").await;
    assert_eq!(post(host, "/api/plugins/analytics/pause", json!({})).await.0, 200);
    const EVENTS: u64 = 12_000;
    for round in 0..EVENTS / 500 {
        let batch: Vec<_> = (0..500).map(|i| event("user.connected", json!({"n": round * 500 + i}))).collect();
        assert_eq!(host.post_events(&json!(batch)).await.0, 201);
    }
    published.await;
    // Full batches from here on: each is read ahead.
    assert_eq!(post(host, "/api/plugins/analytics/resume", json!({})).await.0, 200);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        let status = host.plugin("analytics").await;
        if status["processed"].as_u64().unwrap() > 0 {
            break status;
        }
        assert!(Instant::now() < deadline, "the catch-up never started: {status}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(status["processed"].as_u64().unwrap() < EVENTS, "the replay lands inside the catch-up: {status}");
    let (status, body) = post(host, "/api/plugins/analytics/replay", json!({"from": 0})).await;
    assert_eq!(status, 202, "{body}");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(post(host, "/api/plugins/analytics/pause", json!({})).await.0, 200);
    assert_eq!(post(host, "/api/plugins/analytics/resume", json!({})).await.0, 200);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let swapped = version_of(&std::fs::read(guests::ANALYTICS).unwrap(), 1);
    let (status, body) = put(host, "analytics", swapped, None).await;
    assert_eq!(status, 200, "{body}");
    let status = host.plugin("analytics").await;
    assert!(status["lag"].as_u64().unwrap() > 0, "the swap lands inside the catch-up: {status}");
    host.caught_up("analytics").await;
    let deadline = Instant::now() + WAIT;
    while host.plugin("analytics").await["replay"]["finishedAt"].is_null() {
        assert!(Instant::now() < deadline, "the replay never finished");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let counts = host.query("analytics", "").await;
    assert_eq!(counts["total"], EVENTS, "every event counted once: {counts}");
    assert_eq!(counts["byEventType"]["user.connected"], EVENTS);

    let metrics = host.metrics().await;
    let reads_ahead = |outcome: &str| {
        owlery_testkit::metrics::sum(
            &metrics,
            "owlery_plugin_reads_ahead_total",
            &[("plugin", "analytics"), ("outcome", outcome)],
        )
    };
    assert!(reads_ahead("used") > 100.0, "the catch-up read ahead: {metrics}");
    assert!(reads_ahead("dropped") >= 1.0, "the replay dropped what was read ahead: {metrics}");
}
