//! Crash safety: `kill -9` while publishing loses no acknowledged event, and plugins count
//! every event in the log exactly once after the restart.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::support::{Host, event, guests, reporter_5_update, reporter_5_updates, shipped};

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_while_publishing_loses_nothing_and_counts_nothing_twice() {
    let mut host = Host::with_plugins(&[shipped("analytics")]);
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let running = Arc::new(AtomicBool::new(true));
    let mut publishers = Vec::new();
    for publisher in 0..4 {
        let (http, url, acked, running) = (host.http.clone(), host.url("/api/events"), acked.clone(), running.clone());
        publishers.push(tokio::spawn(async move {
            let mut n = 0;
            while running.load(Ordering::Relaxed) && n < 5_000 {
                n += 1;
                let body = if n % 5 == 0 {
                    json!([
                        event("incident.created", json!({"id": n, "severity": "HIGH", "by": publisher})),
                        event("user.connected", json!({}))
                    ])
                } else {
                    event("incident.updated", json!({"id": n, "by": publisher}))
                };
                let Ok(response) = http.post(&url).json(&body).send().await else { break };
                if response.status().as_u16() != 201 {
                    break;
                }
                let Ok(answer) = response.json::<serde_json::Value>().await else { break };
                let mut acked = acked.lock().await;
                for e in answer["events"].as_array().unwrap() {
                    acked.insert(e["eventId"].as_str().unwrap().to_owned());
                }
            }
        }));
    }
    // Let acknowledgements and plugin commits pile up, then crash mid-stream.
    while acked.lock().await.len() < 400 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    host.kill9();
    running.store(false, Ordering::Relaxed);
    for p in publishers {
        p.await.unwrap();
    }
    let acked = acked.lock().await.clone();
    assert!(acked.len() >= 400);

    host.start();
    let mut in_log = HashSet::new();
    let mut total = 0;
    for topic in ["incident-events", "presence-events"] {
        for record in host.topic_records(topic).await {
            total += 1;
            in_log.insert(record["event"]["eventId"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(in_log.len(), total, "an event is in the log twice");
    let missing: Vec<_> = acked.difference(&in_log).collect();
    assert!(missing.is_empty(), "{} acknowledged events were lost, e.g. {:?}", missing.len(), missing.first());

    host.caught_up("analytics").await;
    let counts = host.query("analytics", "").await;
    assert_eq!(counts["total"], total as u64, "analytics must count every event in the log exactly once");

    // And it keeps going after the restart.
    let (status, _) = host.post_events(&event("incident.resolved", json!({"id": 5}))).await;
    assert_eq!(status, 201);
    host.caught_up("analytics").await;
    assert_eq!(host.query("analytics", "").await["total"], total as u64 + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clean_restart_resumes_from_committed_offsets() {
    let mut host = Host::with_plugins(&[shipped("analytics")]);
    let batch: Vec<_> = (0..50).map(|i| event("incident.created", json!({"id": i, "severity": "LOW"}))).collect();
    assert_eq!(host.post_events(&json!(batch)).await.0, 201);
    host.caught_up("analytics").await;
    let offsets = host.plugin("analytics").await["offsets"].clone();
    host.stop();
    host.start();
    host.caught_up("analytics").await;
    let status = host.plugin("analytics").await;
    assert_eq!(status["offsets"], offsets, "offsets survive a restart");
    assert_eq!(status["processed"], 0, "nothing is handled again after a restart");
    assert_eq!(host.query("analytics", "").await["byEventType"]["incident.created"], 50);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outbox_entry_that_cannot_be_read_is_set_aside_and_the_rest_goes_out() {
    let mut host = Host::with_plugins(&[shipped("alerts")]);
    host.stop();
    // Two poisoned entries at the head of the outbox, as a bug or an older version might
    // leave them: bytes that are not an entry, and an entry nested past the JSON parser's
    // recursion limit.
    {
        use redb::ReadableTable;
        const OUTBOX: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("outbox");
        const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        let db = redb::Database::create(host.dir.path().join("data/store.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            let next = meta.get("outbox_next").unwrap().map_or(0, |v| v.value());
            let deep = format!(
                r#"{{"topic":"alert-events","key":"","envelope":{{"eventId":"{}","eventType":"x.y","timestamp":"2026-01-01T00:00:00Z","source":"s","data":{}1{}}}}}"#,
                uuid::Uuid::new_v4(),
                "[".repeat(200),
                "]".repeat(200)
            );
            let mut outbox = txn.open_table(OUTBOX).unwrap();
            outbox.insert(next, b"not an entry".as_slice()).unwrap();
            outbox.insert(next + 1, deep.as_bytes()).unwrap();
            meta.insert("outbox_next", next + 2).unwrap();
        }
        txn.commit().unwrap();
    }
    host.start();

    let cause = uuid::Uuid::new_v4().to_string();
    let incident = json!({"eventId": cause, "eventType": "incident.created", "source": "test",
                          "data": {"id": 3, "severity": "CRITICAL"}});
    assert_eq!(host.post_events(&incident).await.0, 201);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let alerts = host.topic_records("alert-events").await;
        if alerts.iter().any(|r| r["event"]["metadata"]["causationId"] == cause.as_str()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox is stuck behind its poisoned head: {}",
            host.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The alert is in the log a moment before its entry leaves the outbox.
    loop {
        let (_, status) = host.get("/api/monitoring/iggy-status").await;
        if status["outbox"] == json!({"pending": 0, "setAside": 2}) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(host.log().contains("setting an outbox entry aside"));
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_replay_neither_broadcasts_history_again_nor_skips_the_rest() {
    const PLUGINS: [&str; 2] = ["ws-broadcast", "analytics"];
    let mut host = Host::with_plugins(&[shipped("ws-broadcast"), shipped("analytics")]);
    // The kill must land while both replays are under way: after they finish, the test
    // would pass whatever the host does with a stored replay. 20,000 events take each plugin
    // far longer than the two status requests between asking for the replays and the kill;
    // should a replay be near its end by then anyway (a fast machine), the history grows by
    // as much again and the host is asked once more.
    let mut before = Value::Null;
    let mut killed_mid_replay = false;
    for _ in 0..3 {
        for _ in 0..4 {
            assert_eq!(host.post_events(&json!(reporter_5_updates(5000))).await.0, 201);
        }
        for plugin in PLUGINS {
            host.caught_up(plugin).await;
        }
        before = host.query("analytics", "").await;
        for plugin in PLUGINS {
            let response = host.http.post(host.url(&format!("/api/plugins/{plugin}/replay"))).json(&json!({"from": 0}));
            assert_eq!(response.send().await.unwrap().status(), 202);
        }
        let mut under_way = true;
        for plugin in PLUGINS {
            under_way &= far_from_done(&host.plugin(plugin).await);
        }
        if under_way {
            host.kill9();
            killed_mid_replay = true;
            break;
        }
    }
    assert!(killed_mid_replay, "no try had both replays under way at the kill:\n{}", host.log_tail());
    host.start();
    let mut client = host.ws("?rooms=incident:5").await;
    for plugin in PLUGINS {
        host.caught_up(plugin).await;
    }
    // The line the runner writes when it finds a stored replay at start (only a restart can:
    // the first start had an empty store); its span names the plugin.
    let log = host.log();
    for plugin in PLUGINS {
        let resumed = log.lines().any(|line| line.contains("resuming the replay under way") && line.contains(plugin));
        assert!(resumed, "{plugin}'s replay, under way at the kill, was not resumed:\n{}", host.log_tail());
    }
    assert_eq!(host.query("analytics", "").await, before, "the replay's state is complete and counted once");
    let marker = reporter_5_update(json!("marker"));
    assert_eq!(host.post_events(&marker).await.0, 201);
    let frame = client.next_in_room("incident:5", Duration::from_secs(30)).await.unwrap();
    assert_eq!(frame["event"]["data"]["n"], "marker", "history was broadcast again: {frame}");
}

/// Whether a plugin's status shows it replaying with a quarter or more still to read: so
/// much that it cannot be over by the time the next request (the kill) is made.
fn far_from_done(status: &Value) -> bool {
    let progress = &status["replay"];
    let (Some(done), Some(total)) = (progress["done"].as_u64(), progress["total"].as_u64()) else { return false };
    status["state"] == "replaying" && total > 0 && total.saturating_sub(done) >= total / 4
}

/// A host killed between a promotion's commit and writing the promoted files starts again
/// as the promoted version (the store kept it with the commit), never running the promoted
/// state under the old version.
#[tokio::test(flavor = "multi_thread")]
async fn a_promotion_cut_off_before_its_files_are_written_is_finished_at_start() {
    let flag = tempfile::NamedTempFile::new().unwrap();
    let env = [("OWLERY_TEST_CRASH_AFTER_PROMOTION", flag.path().to_str().unwrap())];
    let mut host = Host::with_config_and_env(&[shipped("analytics")], "", &env);
    let batch: Vec<_> = (0..50).map(|i| event("incident.created", json!({"id": i, "severity": "LOW"}))).collect();
    assert_eq!(host.post_events(&json!(batch)).await.0, 201);
    host.caught_up("analytics").await;
    // The candidate counts events ({"count": n}): easy to tell from analytics.
    let candidate = std::fs::read(guests::MISBEHAVE).unwrap();
    let manifest = "[config]\nmode = \"error\"\n";
    let response = host
        .http
        .post(host.url("/api/plugins/analytics/shadow"))
        .query(&[("manifest", manifest)])
        .header("content-type", "application/wasm")
        .body(candidate.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let promoted = host.http.post(host.url("/api/plugins/analytics/promote?force=true")).send().await;
    assert!(promoted.is_err(), "the host died mid-promotion: {promoted:?}");
    assert!(!flag.path().exists(), "the crash hook ran");
    host.kill9();
    host.start();
    host.caught_up("analytics").await;
    let status = host.plugin("analytics").await;
    assert_eq!(status["version"], hex_sha256(&candidate), "it came back as the promoted version: {status}");
    let saved = std::fs::read(host.dir.path().join("plugins/analytics.wasm")).unwrap();
    assert_eq!(saved, candidate, "the promoted component was written to the plugins directory");
    assert_eq!(host.query("analytics", "").await, json!({"count": 50}), "with the promoted state");
    assert!(host.log().contains("finished writing the files of a promotion"), "{}", host.log_tail());
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}
