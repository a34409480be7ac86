//! Crash safety: `kill -9` while publishing loses no acknowledged event, and plugins count
//! every event in the log exactly once after the restart.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::sync::Mutex;

use crate::support::{Host, event, shipped};

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
