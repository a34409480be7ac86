//! A WebSocket client that drops and comes back with its last offset gets exactly what it
//! missed for its rooms, in order, then live events.

use std::time::Duration;

use serde_json::json;

use crate::support::{Host, event, shipped};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_reconnects_with_its_offset_gets_exactly_what_it_missed() {
    let host = Host::with_plugins(&[shipped("ws-broadcast")]);
    let mut client = host.ws("?rooms=incident:7").await;
    host.post_events(&event("incident.updated", json!({"id": 7, "n": -1}))).await;
    let last = client.next_in_room("incident:7", WAIT).await.unwrap();
    let last_offset = last["offset"].as_u64().unwrap();
    drop(client);

    // 500 for its room and 100 for another, interleaved, while it is away; one user per
    // room keeps each room's events in one partition, so in order.
    let mut batch = Vec::new();
    for n in 0..500 {
        batch.push(json!({"eventType": "incident.updated", "userId": "reporter-7", "data": {"id": 7, "n": n}}));
        if n % 5 == 0 {
            batch.push(json!({"eventType": "incident.updated", "userId": "reporter-8", "data": {"id": 8, "n": n}}));
        }
    }
    assert_eq!(host.post_events(&json!(batch)).await.0, 201);
    host.caught_up("ws-broadcast").await;

    let mut client = host.ws(&format!("?rooms=incident:7&since={last_offset}")).await;
    let mut previous = last_offset;
    for expected in 0..500 {
        let frame = client.next_event(WAIT).await.expect("every missed event is replayed");
        assert_eq!(frame["room"], "incident:7", "{frame}");
        assert_eq!(frame["event"]["data"]["n"], expected, "in order, none missing, none twice");
        let offset = frame["offset"].as_u64().unwrap();
        assert!(offset > previous, "offsets only grow");
        previous = offset;
    }
    host.post_events(&event("incident.updated", json!({"id": 7, "n": "live"}))).await;
    let frame = client.next_event(WAIT).await.unwrap();
    assert_eq!(frame["event"]["data"]["n"], "live", "then live events, with nothing in between: {frame}");
}

#[tokio::test(flavor = "multi_thread")]
async fn broadcasts_older_than_the_retention_age_are_dropped_and_a_resuming_client_is_told() {
    let host = Host::with_config(&[shipped("ws-broadcast")], "fanout_max_age_secs = 1\n");
    host.post_events(&event("incident.created", json!({"id": "old"}))).await;
    host.caught_up("ws-broadcast").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    host.post_events(&event("incident.created", json!({"id": "new"}))).await;
    host.caught_up("ws-broadcast").await;

    let mut client = host.ws("?since=-1").await;
    let notice = client.next_json(WAIT).await.unwrap();
    assert_eq!(notice["type"], "gap", "the client is told what is no longer retained: {notice}");
    assert_eq!(notice["oldest"], 1);
    let frame = client.next_event(WAIT).await.unwrap();
    assert_eq!(frame["event"]["data"]["id"], "new");
}
