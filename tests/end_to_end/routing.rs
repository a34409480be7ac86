//! Publish → ws-broadcast plugin → WebSocket rooms; analytics and alerts on the same stream.

use std::time::Duration;

use serde_json::json;

use crate::support::{Host, event};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn incident_created_reaches_everyone_and_an_update_only_its_room() {
    let host = Host::with_shipped_plugins();
    let mut no_rooms = host.ws("").await;
    let mut room_42 = host.ws("?rooms=incident:42").await;
    let mut room_7 = host.ws("?rooms=incident:7").await;

    let (status, body) = host.post_events(&event("incident.created", json!({"id": 42, "severity": "HIGH"}))).await;
    assert_eq!(status, 201, "{body}");
    let created_id = body["events"][0]["eventId"].clone();
    for client in [&mut no_rooms, &mut room_42, &mut room_7] {
        let frame = client.next_event(WAIT).await.expect("incident.created is broadcast to room all");
        assert_eq!(frame["room"], "all");
        assert_eq!(frame["event"]["eventType"], "incident.created");
        assert_eq!(frame["event"]["eventId"], created_id);
        assert!(frame["offset"].is_u64());
    }

    let (status, _) = host.post_events(&event("incident.updated", json!({"id": 42, "status": "investigating"}))).await;
    assert_eq!(status, 201);
    let frame = room_42.next_event(WAIT).await.expect("the update reaches room incident:42");
    assert_eq!(frame["room"], "incident:42");
    assert_eq!(frame["event"]["eventType"], "incident.updated");
    assert_eq!(frame["event"]["data"]["status"], "investigating");

    // The update has been fanned out. The next thing the others see must be this later
    // event, not the update.
    let (status, _) = host.post_events(&event("incident.created", json!({"incidentId": "43"}))).await;
    assert_eq!(status, 201);
    for client in [&mut no_rooms, &mut room_7] {
        let frame = client.next_event(WAIT).await.expect("the later event arrives");
        assert_eq!(frame["event"]["eventType"], "incident.created", "{frame}");
        assert_eq!(frame["event"]["data"]["incidentId"], "43");
    }
    let frame = room_42.next_event(WAIT).await.unwrap();
    assert_eq!(frame["event"]["data"]["incidentId"], "43");

    // Joining a room while connected.
    room_7.send_json(&json!({"subscribe": ["incident:42"]})).await;
    let ack = room_7.next_json(WAIT).await.unwrap();
    assert_eq!(ack["type"], "rooms");
    assert!(ack["rooms"].as_array().unwrap().contains(&json!("incident:42")));
    host.post_events(&event("comment.added", json!({"incidentId": 42, "text": "on it"}))).await;
    let frame = room_7.next_event(WAIT).await.expect("a joined room is delivered");
    assert_eq!(frame["room"], "incident:42");
    assert_eq!(frame["event"]["eventType"], "comment.added");
}

#[tokio::test(flavor = "multi_thread")]
async fn analytics_counts_exactly_what_was_published() {
    let host = Host::with_shipped_plugins();
    let batch = json!([
        event("incident.created", json!({"id": 1, "severity": "HIGH"})),
        event("incident.created", json!({"id": 2, "severity": "HIGH"})),
        event("incident.created", json!({"id": 3, "severity": "HIGH"})),
        event("incident.created", json!({"id": 4, "severity": "CRITICAL"})),
        event("incident.resolved", json!({"id": 1})),
        event("user.connected", json!({})),
        event("user.connected", json!({})),
    ]);
    let (status, body) = host.post_events(&batch).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["events"].as_array().unwrap().len(), 7);
    let fixed_id = "6f1c1f8e-8a51-4c43-9d3e-1f2a3b4c5d6e";
    let once = json!({"eventId": fixed_id, "eventType": "comment.added", "source": "mobile", "userId": "u1", "data": {"incidentId": 2}});
    let (status, first) = host.post_events(&once).await;
    assert_eq!(status, 201);
    assert_eq!(first["events"][0]["duplicate"], false);
    let (status, again) = host.post_events(&once).await;
    assert_eq!(status, 201, "a repeated eventId is accepted");
    assert_eq!(again["events"][0]["duplicate"], true);
    assert_eq!(again["events"][0]["offset"], first["events"][0]["offset"]);

    // The CRITICAL incident makes alerts publish one alert.raised, which analytics counts too.
    wait_for_records(&host, "alert-events", 1).await;
    host.caught_up("analytics").await;
    let counts = host.query("analytics", "").await;
    assert_eq!(
        counts["byEventType"],
        json!({"incident.created": 4, "incident.resolved": 1, "user.connected": 2, "comment.added": 1, "alert.raised": 1})
    );
    assert_eq!(counts["total"], 9);
    assert_eq!(counts["bySource"], json!({"test": 7, "mobile": 1, "plugin:alerts": 1}));
    assert_eq!(counts["openBySeverity"], json!({"HIGH": 2, "CRITICAL": 1}));
    // The alert carries the severity of its incident.
    assert_eq!(counts["bySeverity"], json!({"HIGH": 3, "CRITICAL": 2}));
    let minutes: u64 = counts["perMinute"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(minutes, 9);
    let narrowed = host.query("analytics", "?view=openBySeverity").await;
    assert_eq!(narrowed, json!({"openBySeverity": {"HIGH": 2, "CRITICAL": 1}}));

    let (status, body) = host.get("/api/plugins").await;
    assert_eq!(status, 200);
    let analytics = body["plugins"].as_array().unwrap().iter().find(|p| p["name"] == "analytics").unwrap().clone();
    assert_eq!(analytics["state"], "running");
    assert_eq!(analytics["processed"], 9);
    assert_eq!(analytics["lag"], 0);
    assert_eq!(analytics["version"].as_str().unwrap().len(), 64);
}

#[tokio::test(flavor = "multi_thread")]
async fn alerts_fire_on_critical_incidents_and_bursts_in_one_location() {
    let host = Host::with_shipped_plugins();
    let mut alerts = host.ws("?rooms=alerts").await;
    let (status, body) =
        host.post_events(&event("incident.created", json!({"id": 9, "severity": "UNFORGIVABLE"}))).await;
    assert_eq!(status, 201);
    let cause = body["events"][0]["eventId"].clone();
    let frame = alerts.next_in_room("alerts", WAIT).await.expect("an alert is broadcast");
    assert_eq!(frame["room"], "alerts");
    assert_eq!(frame["event"]["rule"], "severity");
    assert_eq!(frame["event"]["sourceEventId"], cause);

    for id in 10..13 {
        let (status, _) = host
            .post_events(&event("incident.created", json!({"id": id, "severity": "LOW", "location": "dock-7"})))
            .await;
        assert_eq!(status, 201);
    }
    let frame = alerts.next_in_room("alerts", WAIT).await.expect("a burst alert is broadcast");
    assert_eq!(frame["event"]["rule"], "burst");
    assert_eq!(frame["event"]["location"], "dock-7");
    assert_eq!(frame["event"]["count"], 3);

    let records = wait_for_records(&host, "alert-events", 2).await;
    for record in &records {
        assert_eq!(record["event"]["eventType"], "alert.raised");
        assert_eq!(record["event"]["source"], "plugin:alerts");
    }
    assert_eq!(records.iter().filter(|r| r["event"]["metadata"]["causationId"] == cause).count(), 1);
}

async fn wait_for_records(host: &Host, topic: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let records = host.topic_records(topic).await;
        if records.len() >= n {
            assert_eq!(records.len(), n, "more records than expected in {topic}: {records:?}");
            return records;
        }
        assert!(std::time::Instant::now() < deadline, "{topic} has {} records, want {n}", records.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
