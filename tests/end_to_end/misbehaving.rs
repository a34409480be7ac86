//! Plugins that trap, loop forever or allocate without bound: the host keeps serving, the
//! poisoned event goes to the dead-letter topic, and every other plugin keeps up.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::support::{Host, event, guests, shipped};

fn misbehaving(name: &str, mode: &str) -> (String, PathBuf, String) {
    let manifest = format!(
        r#"
[subscribe]
topics = ["events"]

[limits]
memory_mb = 16
batch_timeout_ms = 300
max_batch = 64
retries = 1

[config]
mode = "{mode}"
"#
    );
    (name.to_owned(), PathBuf::from(guests::MISBEHAVE), manifest)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_plugins_dead_letter_the_poisoned_event_and_nobody_else_notices() {
    let host = Host::with_plugins(&[
        misbehaving("trapper", "trap"),
        misbehaving("looper", "loop"),
        misbehaving("hog", "alloc"),
        misbehaving("refuser", "error"),
        shipped("analytics"),
    ]);
    let mut events: Vec<_> = (0..10).map(|i| event("test.tick", json!({"n": i}))).collect();
    events[5] = event("test.tick", json!({"n": 5, "poison": true}));
    let (status, body) = host.post_events(&json!(events)).await;
    assert_eq!(status, 201, "{body}");
    let poisoned = body["events"][5].clone();

    for plugin in ["trapper", "looper", "hog", "refuser"] {
        host.caught_up(plugin).await;
        assert_eq!(host.query(plugin, "").await["count"], 9, "{plugin} handles every other event");
        let status = host.plugin(plugin).await;
        assert_eq!(status["deadLetters"], 1, "{plugin}: {status}");
        assert!(
            status["lastError"]
                .as_str()
                .unwrap()
                .contains(&format!("events/{}/{}", poisoned["partition"], poisoned["offset"])),
            "{status}"
        );
    }
    let looper = host.plugin("looper").await;
    assert!(looper["lastError"].as_str().unwrap().contains("timed out"), "{looper}");

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let letters = loop {
        let letters = host.topic_records("dead-letters").await;
        if letters.len() >= 4 || std::time::Instant::now() > deadline {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut plugins: Vec<_> =
        letters.iter().map(|l| l["event"]["data"]["plugin"].as_str().unwrap().to_owned()).collect();
    plugins.sort();
    assert_eq!(plugins, ["hog", "looper", "refuser", "trapper"]);
    for letter in &letters {
        let data = &letter["event"]["data"];
        assert_eq!(letter["event"]["eventType"], "owlery.dead_letter");
        assert_eq!(data["event"]["eventId"], poisoned["eventId"]);
        assert_eq!(data["offset"], poisoned["offset"]);
        assert!(!data["error"].as_str().unwrap().is_empty());
    }

    host.caught_up("analytics").await;
    assert_eq!(host.query("analytics", "").await["total"], 10);
    let (status, health) = host.get("/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
    let log = host.log();
    assert!(log.contains("misbehaving on"), "guest stdout is routed to the host log");
    assert!(log.contains("dead-letter"), "the dead letter is logged");
}
