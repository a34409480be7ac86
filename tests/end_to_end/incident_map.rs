//! The incident map's team moving onto Owlery: one incident's events in order whoever sends
//! them, presence published by the host, every catalog event type routed, their Socket.IO
//! browser code and API tokens unchanged, and catch-up by last offset.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Host, Ws, event, shipped};

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "the incident map's api secret, 32+ bytes";

fn jwt(claims: Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

/// A token as the team's API issues them: a subject and an expiry, no Owlery claims.
fn api_token(user: &str) -> String {
    jwt(json!({"sub": user, "exp": owlery::envelope::now_millis() / 1000 + 3600}))
}

fn update(user: &str, seq: u64) -> Value {
    json!({"eventType": "incident.updated", "userId": user, "source": "api", "data": {"id": 42, "seq": seq}})
}

#[tokio::test(flavor = "multi_thread")]
async fn one_incidents_updates_from_three_users_keep_their_publish_order() {
    // Under the old key (the user) these three land in different partitions.
    let users = ["ana", "bo", "cy"];
    let old: HashSet<u32> = users.iter().map(|u| owlery::log::partition_for(u, 4)).collect();
    assert!(old.len() > 1, "the test needs users the old routing would split");

    let host = Host::with_plugins(&[shipped("ws-broadcast"), shipped("analytics")]);
    let mut room = host.ws("?rooms=incident:42").await;
    let mut socket_io = crate::socketio::raw_socket_io_client(&host, &json!({"rooms": ["incident:42"]})).await;
    // Paused, the plugin later reads a backlog: partition by partition if they were split.
    let (status, body) = host.post_json("/api/plugins/ws-broadcast/pause", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    for seq in 0..30u64 {
        let (status, body) = host.post_events(&update(users[seq as usize % 3], seq)).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = host.post_json("/api/plugins/ws-broadcast/resume", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    for seq in 0..30u64 {
        let frame = room.next_in_room("incident:42", WAIT).await.expect("every update is broadcast");
        assert_eq!(frame["event"]["data"]["seq"], seq, "in publish order: {frame}");
        assert_eq!(frame["eventType"], "incident.updated");
    }
    // Socket.IO too: the payload first, in the same order.
    let mut seqs = Vec::new();
    while seqs.len() < 30 {
        use futures_util::StreamExt;
        let message =
            tokio::time::timeout(WAIT, socket_io.next()).await.expect("Socket.IO gets them").unwrap().unwrap();
        if let Some(array) = message.to_text().unwrap().strip_prefix("42") {
            let event: Value = serde_json::from_str(array).unwrap();
            if event[0] == "incident:updated" {
                seqs.push(event[1]["data"]["seq"].as_u64().unwrap());
            }
        }
    }
    assert_eq!(seqs, (0..30).collect::<Vec<_>>());
    // The log holds them in one partition, in order: every plugin reads them so.
    let records = host.topic_records("incident-events").await;
    let partitions: HashSet<u64> = records.iter().map(|r| r["partition"].as_u64().unwrap()).collect();
    assert_eq!(partitions.len(), 1, "one incident, one partition: {partitions:?}");
    let seqs: Vec<u64> = records.iter().map(|r| r["event"]["data"]["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..30).collect::<Vec<_>>());
    host.caught_up("analytics").await;
    assert_eq!(host.query("analytics", "").await["byEventType"]["incident.updated"], 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn routing_is_configurable_and_takes_the_incident_maps_topic_names() {
    let config = r#"
[[routing.routes]]
pattern = "billing.*"
topic = "billing"
key = ["data.account"]
"#;
    let env = [("IGGY_INCIDENT_TOPIC", "incident_events"), ("IGGY_PRESENCE_TOPIC", "presence_events")];
    let host = Host::with_config_and_env(&[shipped("ws-broadcast")], config, &env);
    let mut all = host.ws("").await;
    let batch = json!([
        {"eventType": "billing.paid", "data": {"account": "acme", "n": 1}},
        {"eventType": "billing.refunded", "data": {"account": "acme", "n": 2}},
        event("incident.created", json!({"id": 5})),
        event("user.connected", json!({})),
    ]);
    let (status, body) = host.post_events(&batch).await;
    assert_eq!(status, 201, "{body}");
    let topics: Vec<&str> = body["events"].as_array().unwrap().iter().map(|e| e["topic"].as_str().unwrap()).collect();
    assert_eq!(topics, ["billing", "billing", "incident_events", "presence_events"]);
    assert_eq!(body["events"][0]["partition"], body["events"][1]["partition"], "one account, one partition");
    // ws-broadcast follows the renamed topic (its manifest names event types, not topics).
    let frame = all.next_in_room("all", WAIT).await.expect("incident.created from the renamed topic");
    assert_eq!(frame["event"]["data"]["id"], 5);
    // A bad route refuses to start, naming it.
    let bad = "[[routing.routes]]\npattern = \"x.*\"\ntopic = \"dead-letters\"\n";
    crate::auth::refuses_to_start(
        Some(bad),
        "127.0.0.1:0",
        "routes[0] (\"x.*\"): topic: \"dead-letters\" is one of Owlery's own",
    );
}

/// Every event type the incident map's documents name: its topic, and the room
/// ws-broadcast sends it to (None: not broadcast).
const CATALOG: &[(&str, &str, Option<&str>)] = &[
    ("incident.created", "incident-events", Some("all")),
    ("incident.updated", "incident-events", Some("incident:7")),
    ("incident.resolved", "incident-events", Some("all")),
    ("incident.deleted", "incident-events", Some("all")),
    ("comment.added", "incident-events", Some("incident:7")),
    ("comment.created", "incident-events", Some("incident:7")),
    ("severity.escalated", "incident-events", Some("incident:7")),
    ("user.connected", "presence-events", Some("presence")),
    ("user.disconnected", "presence-events", Some("presence")),
    ("user.joined_room", "presence-events", Some("presence")),
    ("user.left_room", "presence-events", Some("presence")),
    ("presence.connected", "presence-events", Some("presence")),
    ("presence.disconnected", "presence-events", Some("presence")),
    ("user.logged_in", "auth-events", None),
    ("user.logged_out", "auth-events", None),
    ("user.registered", "auth-events", None),
    ("token.refreshed", "auth-events", None),
    ("alert.raised", "alert-events", None),
];

#[tokio::test(flavor = "multi_thread")]
async fn every_catalog_event_type_is_routed_and_broadcast_where_the_map_expects() {
    let host = Host::with_plugins(&[shipped("ws-broadcast")]);
    let mut clients = Vec::new();
    for room in ["", "?rooms=incident:7", "?rooms=presence"] {
        clients.push(host.ws(room).await);
    }
    for (n, (event_type, topic, room)) in CATALOG.iter().enumerate() {
        // A comment's own id is not its incident's.
        let data = match *event_type {
            t if t.starts_with("comment.") => json!({"id": format!("c-{n}"), "incidentId": 7, "n": n}),
            _ => json!({"id": 7, "n": n}),
        };
        let mut e = event(event_type, data);
        e["userId"] = json!("u-1");
        let (status, body) = host.post_events(&e).await;
        assert_eq!(status, 201, "{event_type}: {body}");
        assert_eq!(body["events"][0]["topic"], *topic, "{event_type}");
        host.caught_up("ws-broadcast").await;
        // Client 0 is in `all` only, 1 also in incident:7, 2 also in presence.
        let expected: Vec<bool> = match room {
            None => vec![false, false, false],
            Some("all") => vec![true, true, true],
            Some("incident:7") => vec![false, true, false],
            Some(_) => vec![false, false, true],
        };
        for (client, wanted) in clients.iter_mut().zip(expected) {
            let frame = client.next_event(Duration::from_millis(if wanted { 10_000 } else { 300 })).await;
            match (wanted, frame) {
                (true, Some(frame)) => {
                    assert_eq!(frame["room"], room.unwrap(), "{event_type}: {frame}");
                    assert_eq!(frame["eventType"], *event_type);
                    assert_eq!(frame["event"]["data"]["n"], n);
                }
                (true, None) => panic!("{event_type} was not broadcast to {room:?}"),
                (false, Some(frame)) => panic!("{event_type} reached a client outside {room:?}: {frame}"),
                (false, None) => {}
            }
        }
    }
    // One incident's events (comments and escalations too) share one partition.
    let records = host.topic_records("incident-events").await;
    let partitions: HashSet<u64> = records.iter().map(|r| r["partition"].as_u64().unwrap()).collect();
    assert_eq!((records.len(), partitions.len()), (7, 1), "{records:?}");
}

/// The incident map's browser code, as its team wrote it: `io(url, {auth: {token}})`, then
/// one handler per event reading the seed's payload shapes.
const SEED_CLIENT: &str = r#"
const { io } = require("socket.io-client");
const [url, token, room] = process.argv.slice(2);
const say = (o) => console.log(JSON.stringify(o));

const socket = io(url, { auth: { token } });
socket.on("connect", () => {
  if (room) socket.emit("subscribe", [room]);
  else say({ connected: true });
});
socket.on("rooms", () => say({ connected: true }));
socket.on("incident:created", (data) => {
  say({ on: "incident:created", title: data.incident.title, by: data.createdBy.userId });
});
socket.on("incident:updated", (data) => {
  say({ on: "incident:updated", status: data.incident.status, by: data.updatedBy.userId });
});
socket.on("incident:resolved", (data) => {
  say({ on: "incident:resolved", incidentId: data.incidentId, by: data.resolvedBy.userId, resolution: data.resolution });
  process.exit(0);
});
socket.on("connect_error", (e) => { say({ error: e.message }); process.exit(2); });
socket.on("error", (e) => { say({ error: e }); process.exit(2); });
setTimeout(() => { console.error("timed out"); process.exit(1); }, 30000);
"#;

fn seed_client(dir: &std::path::Path, url: &str, token: &str, room: &str) -> std::process::Child {
    Command::new("node")
        .arg("seed-client.js")
        .args([url, token, room])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(owlery_skip_node, ignore = "SKIPPED: OWLERY_SKIP_NODE=1")]
async fn the_incident_maps_socket_io_client_runs_unchanged_with_its_apis_tokens() {
    let node_dir = crate::socketio::node_packages();
    let dir = tempfile::Builder::new().prefix(".seed-").tempdir_in(node_dir).unwrap();
    std::fs::write(dir.path().join("seed-client.js"), SEED_CLIENT).unwrap();
    let (name, wasm, manifest) = shipped("ws-broadcast");
    let manifest = manifest.replace(r#"payload = "envelope""#, r#"payload = "incident-map""#);
    assert!(manifest.contains("incident-map"));
    let config = format!(
        "[auth]\nenabled = true\njwt_secret = \"{SECRET}\"\njwt_default_scopes = [\"subscribe\"]\n\
         jwt_default_rooms = [\"incident:*\"]\n[[auth.tokens]]\ntoken = \"api-publisher\"\nscopes = [\"publish\"]\n"
    );
    let host = Host::with_config(&[(name, wasm, manifest)], &config);

    // A token of the API's that grants nothing here unless the defaults say so is refused
    // on routes needing other scopes.
    let refused = host.http.post(host.url("/api/events")).bearer_auth(api_token("ana")).json(&update("ana", 0));
    assert_eq!(refused.send().await.unwrap().status(), 403, "jwt_default_scopes grants subscribe only");

    // One tab in room all only (the seed's code as written), one that joined incident 42.
    let mut everyone = seed_client(dir.path(), &host.base, &api_token("ana"), "");
    let mut watcher = seed_client(dir.path(), &host.base, &api_token("bo"), "incident:42");
    let mut lines_all = BufReader::new(everyone.stdout.take().unwrap()).lines();
    let mut lines_42 = BufReader::new(watcher.stdout.take().unwrap()).lines();
    for lines in [&mut lines_all, &mut lines_42] {
        let first = tokio::task::block_in_place(|| lines.next()).unwrap().unwrap();
        assert_eq!(first, r#"{"connected":true}"#);
    }
    let publish = |body: Value| host.http.post(host.url("/api/events")).bearer_auth("api-publisher").json(&body).send();
    let events = [
        json!({"eventType": "incident.created", "userId": "ana", "data": {"id": 42, "title": "Flooded road"}}),
        json!({"eventType": "incident.updated", "userId": "bo", "data": {"id": 42, "status": "investigating"}}),
        json!({"eventType": "incident.resolved", "userId": "cy", "data": {"id": 42, "resolution": "drained"}}),
    ];
    for e in events {
        assert_eq!(publish(e).await.unwrap().status(), 201);
    }
    let read_all = |lines: std::io::Lines<BufReader<std::process::ChildStdout>>| {
        lines.map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap()).collect::<Vec<_>>()
    };
    let (got_all, got_42) = tokio::task::block_in_place(|| (read_all(lines_all), read_all(lines_42)));
    let created = json!({"on": "incident:created", "title": "Flooded road", "by": "ana"});
    let updated = json!({"on": "incident:updated", "status": "investigating", "by": "bo"});
    // The id as it was sent: a number stays a number.
    let resolved = json!({"on": "incident:resolved", "incidentId": 42, "by": "cy", "resolution": "drained"});
    assert_eq!(got_all, [created.clone(), resolved.clone()], "room all: created and resolved go to everyone");
    assert_eq!(got_42, [created, updated, resolved], "incident 42's room gets its update too");
    for child in [&mut everyone, &mut watcher] {
        assert!(tokio::task::block_in_place(|| child.wait()).unwrap().success());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_io_meta_carries_the_offset_clients_resume_from() {
    // The raw engine.io client sees the two arguments: the payload as broadcast, then where
    // it stands.
    let host = Host::with_plugins(&[shipped("ws-broadcast")]);
    host.post_events(&event("incident.created", json!({"id": 3}))).await;
    host.caught_up("ws-broadcast").await;
    let mut raw = crate::socketio::raw_socket_io_client(&host, &json!({"since": -1})).await;
    let event = loop {
        use futures_util::StreamExt;
        let message = tokio::time::timeout(WAIT, raw.next()).await.unwrap().unwrap().unwrap();
        if let Some(array) = message.to_text().unwrap().strip_prefix("42") {
            break serde_json::from_str::<Value>(array).unwrap();
        }
    };
    assert_eq!(event[0], "incident:created");
    assert_eq!(event[1]["data"]["id"], 3, "the payload, as the plugin broadcast it: {event}");
    assert_eq!(event[2]["offset"], 0);
    assert_eq!(event[2]["room"], "all");
    assert_eq!(event[2]["plugin"], "ws-broadcast");
    assert_eq!(event[2]["eventType"], "incident.created");
}

/// Frames of room `presence` about `user`, as (eventType, room) until `until` arrives.
async fn presence_of(watcher: &mut Ws, user: &str, until: &str) -> Vec<(String, Value)> {
    let mut seen = Vec::new();
    loop {
        let frame = watcher.next_in_room("presence", WAIT).await.expect("presence events are broadcast");
        let data = &frame["event"]["data"];
        if data["userId"] != user {
            continue;
        }
        let event_type = frame["eventType"].as_str().unwrap().to_owned();
        seen.push((event_type.clone(), data["room"].clone()));
        if event_type == until {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_host_publishes_presence_once_per_change_for_websocket_and_socket_io_clients() {
    let config = format!(
        "[presence]\nenabled = true\n[auth]\nenabled = true\njwt_secret = \"{SECRET}\"\n\
         jwt_default_scopes = [\"subscribe\"]\njwt_default_rooms = [\"*\"]\n\
         [[auth.tokens]]\ntoken = \"ops\"\nscopes = [\"admin\"]\n"
    );
    let host = Host::with_config(&[shipped("ws-broadcast")], &config);
    let token = |user: &str| api_token(user);
    let mut watcher = host.ws(&format!("?rooms=presence&token={}", token("watcher"))).await;

    // A /ws client: connects in incident:1, joins incident:2 (and incident:1 again, which
    // is no change), leaves incident:1, goes.
    let mut ana = host.ws(&format!("?rooms=incident:1&token={}", token("ana"))).await;
    ana.send_json(&json!({"subscribe": ["incident:2", "incident:1"]})).await;
    assert_eq!(ana.next_json(WAIT).await.unwrap()["type"], "rooms");
    ana.send_json(&json!({"unsubscribe": ["incident:1", "incident:9"]})).await;
    assert_eq!(ana.next_json(WAIT).await.unwrap()["type"], "rooms");
    drop(ana);
    let seen = presence_of(&mut watcher, "ana", "user.disconnected").await;
    let expected = [
        ("user.connected", Value::Null),
        ("user.joined_room", json!("incident:1")),
        ("user.joined_room", json!("incident:2")),
        ("user.left_room", json!("incident:1")),
        ("user.disconnected", Value::Null),
    ];
    let expected: Vec<(String, Value)> = expected.into_iter().map(|(t, r)| (t.to_owned(), r)).collect();
    assert_eq!(seen, expected);

    // A Socket.IO client (engine.io over a raw WebSocket): connect, subscribe, unsubscribe, go.
    let mut bo =
        crate::socketio::raw_socket_io_client(&host, &json!({"token": token("bo"), "rooms": ["incident:5"]})).await;
    {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        // Sent the moment it is connected, as clients do in their `connect` handler; each
        // answered (`rooms`) before the next, as socketioxide runs handlers concurrently.
        for change in [r#"42["subscribe",["incident:6"]]"#, r#"42["unsubscribe",["incident:5"]]"#] {
            bo.send(Message::Text(change.into())).await.unwrap();
            loop {
                let message = tokio::time::timeout(WAIT, bo.next()).await.expect("an answer").unwrap().unwrap();
                if message.to_text().unwrap().starts_with(r#"42["rooms""#) {
                    break;
                }
            }
        }
        bo.close(None).await.unwrap();
    }
    let seen = presence_of(&mut watcher, "bo", "user.disconnected").await;
    let expected = [
        ("user.connected", Value::Null),
        ("user.joined_room", json!("incident:5")),
        ("user.joined_room", json!("incident:6")),
        ("user.left_room", json!("incident:5")),
        ("user.disconnected", Value::Null),
    ];
    let expected: Vec<(String, Value)> = expected.into_iter().map(|(t, r)| (t.to_owned(), r)).collect();
    assert_eq!(seen, expected);

    // Each change is in the log once, as an event plugins and replays see, keyed by user.
    let replay = host.url("/api/events/replay?topic=presence-events&limit=1000");
    let page: Value = host.http.get(replay).bearer_auth("ops").send().await.unwrap().json().await.unwrap();
    let records = page["records"].as_array().unwrap().clone();
    let of = |user: &str| records.iter().filter(|r| r["event"]["userId"] == user).collect::<Vec<_>>();
    assert_eq!((of("ana").len(), of("bo").len()), (5, 5), "{records:?}");
    for record in of("ana") {
        assert_eq!(record["event"]["source"], "owlery");
        assert_eq!(record["event"]["data"]["transport"], "websocket");
        assert_eq!(record["partition"], of("ana")[0]["partition"], "one user, one partition, one order");
    }
    assert_eq!(of("bo")[0]["event"]["data"]["transport"], "socket.io");
}

#[tokio::test(flavor = "multi_thread")]
async fn presence_without_a_token_names_an_anonymous_connection_and_is_off_by_default() {
    let host = Host::with_config(&[shipped("ws-broadcast")], "[presence]\nenabled = true\n");
    let mut watcher = host.ws("?rooms=presence").await;
    let first = watcher.next_in_room("presence", WAIT).await.expect("the watcher's own connect");
    let user = first["event"]["data"]["userId"].as_str().unwrap().to_owned();
    assert!(user.starts_with("anonymous:"), "{user}");
    assert_eq!(first["event"]["data"]["connectionId"].as_str(), user.strip_prefix("anonymous:"));

    // Producers cannot pass their events off as the host's.
    let forged = json!({"eventType": "user.connected", "source": "owlery", "userId": "ana"});
    let (status, body) = host.post_events(&forged).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("source")), "{body}");

    let off = Host::with_plugins(&[shipped("ws-broadcast")]);
    drop(off.ws("?rooms=incident:1").await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(off.topic_records("presence-events").await.is_empty(), "presence is off unless enabled");
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_by_last_offset_sends_what_follows_it_per_partition() {
    let host = Host::with_plugins(&[]);
    // Two incidents, so (with four partitions) usually two partitions; either way each
    // partition's offsets are checked on their own.
    let batch: Vec<Value> = (0..20).map(|n| event("incident.updated", json!({"id": 100 + n % 2, "n": n}))).collect();
    assert_eq!(host.post_events(&json!(batch)).await.0, 201);
    let all = host.topic_records("incident-events").await;
    let partition = all[0]["partition"].as_u64().unwrap();
    let in_partition: Vec<u64> =
        all.iter().filter(|r| r["partition"] == partition).map(|r| r["offset"].as_u64().unwrap()).collect();

    let (status, page) =
        host.get(&format!("/api/events/replay?topic=incident-events&partition={partition}&lastOffset=5")).await;
    assert_eq!(status, 200, "{page}");
    let offsets: Vec<u64> = page["records"].as_array().unwrap().iter().map(|r| r["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, in_partition.iter().copied().filter(|o| *o > 5).collect::<Vec<_>>(), "6 onwards");

    // Per partition: the `next` of one page, or last offsets, sent back.
    let (_, first) = host.get("/api/events/replay?topic=incident-events&limit=3").await;
    let next = first["next"].as_object().unwrap();
    let from = next.iter().map(|(p, o)| format!("{p}:{o}")).collect::<Vec<_>>().join(",");
    let last = next.iter().map(|(p, o)| format!("{p}:{}", o.as_u64().unwrap() as i64 - 1)).collect::<Vec<_>>();
    let (_, by_from) = host.get(&format!("/api/events/replay?topic=incident-events&fromOffset={from}")).await;
    let (_, by_last) =
        host.get(&format!("/api/events/replay?topic=incident-events&lastOffset={}", last.join(","))).await;
    assert_eq!(by_from["records"], by_last["records"]);
    let seen = first["records"].as_array().unwrap().len() + by_from["records"].as_array().unwrap().len();
    assert_eq!(seen, 20, "the first page and the rest are everything, once");

    // The largest offsets there are: nothing after them, not an overflow.
    for edge in [
        "lastOffset=18446744073709551615",
        "fromOffset=18446744073709551615",
        "partition=0&lastOffset=18446744073709551615",
    ] {
        let (status, page) = host.get(&format!("/api/events/replay?topic=incident-events&{edge}")).await;
        assert_eq!(status, 200, "{edge}: {page}");
        assert_eq!(page["records"], json!([]), "{edge}");
    }
    for bad in ["lastOffset=x", "lastOffset=-2", "lastOffset=0:", "fromOffset=1&lastOffset=1", "lastOffset=a:1"] {
        let (status, body) = host.get(&format!("/api/events/replay?topic=incident-events&{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["field"] == "lastOffset" || body["field"] == "fromOffset", "{bad}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_that_changes_presence_too_often_is_refused_not_published() {
    let config = "[presence]\nenabled = true\nmax_changes_per_minute = 6\n";
    let host = Host::with_config(&[shipped("ws-broadcast")], config);
    // Connect (1), two rooms (2) and, later, its disconnect (1): 4 of 6.
    let mut client = host.ws("?rooms=incident:1,incident:2").await;
    client.send_json(&json!({"subscribe": ["incident:3", "incident:4", "incident:5"]})).await;
    let refused = client.next_json(WAIT).await.unwrap();
    assert_eq!(refused["type"], "error", "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("presence.max_changes_per_minute"), "{refused}");
    client.send_json(&json!({"subscribe": ["incident:3"]})).await;
    assert_eq!(client.next_json(WAIT).await.unwrap()["type"], "rooms", "one more fits");
    // The budget is spent: another connection of the same token is turned away.
    let url = format!("{}/ws?rooms=incident:9", host.base.replace("http://", "ws://"));
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("expected 429, got {other:?}"),
    }
    // Clients without a user are budgeted per address: one from another address (here
    // 127.0.0.2) is not turned away because an anonymous neighbour spent its budget.
    let addr: std::net::SocketAddr = host.base.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let url = format!("{}/ws?rooms=incident:9", host.base.replace("http://", "ws://"));
    let (mut other, response) = tokio_tungstenite::client_async(url, tcp).await.expect("another address connects");
    assert_eq!(response.status(), 101);
    let welcome =
        tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut other)).await.unwrap().unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains("welcome"), "{welcome:?}");
    drop(other);
    drop(client);
    // What was published: each client's connect, joins (three, one) and disconnect; nothing
    // refused made an event.
    let deadline = std::time::Instant::now() + WAIT;
    let types = loop {
        let records = host.topic_records("presence-events").await;
        let types: Vec<String> = records.iter().map(|r| r["event"]["eventType"].as_str().unwrap().to_owned()).collect();
        if types.iter().filter(|t| *t == "user.disconnected").count() >= 2 || std::time::Instant::now() > deadline {
            break types;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let count = |t: &str| types.iter().filter(|x| *x == t).count();
    assert_eq!(
        (count("user.connected"), count("user.joined_room"), count("user.left_room"), count("user.disconnected")),
        (2, 4, 0, 2),
        "{types:?}"
    );
}
