//! The real `socket.io-client` from npm receives broadcasts, by room, from a given offset.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::support::{Host, event, guests, shipped};

const CLIENT: &str = r#"
const { io } = require("socket.io-client");
const [url, rooms, since, want] = process.argv.slice(2);
const socket = io(url, { auth: { rooms: rooms ? rooms.split(",") : [], since: Number(since) }, transports: ["websocket"] });
const got = [];
socket.on("connect", () => console.log(JSON.stringify({ connected: true })));
socket.onAny((name, payload, meta) => {
  got.push({ name, room: meta.room, offset: meta.offset, id: payload && payload.data && payload.data.id });
  if (got.length >= Number(want)) { console.log(JSON.stringify(got)); process.exit(0); }
});
setTimeout(() => { console.error("timed out with " + JSON.stringify(got)); process.exit(1); }, 30000);
"#;

/// The npm packages `./test.sh` installs (`npm ci` in tests/node); panics, saying so, when
/// they are not there.
pub fn node_packages() -> &'static Path {
    let dir = Path::new(guests::TEST_NODE_DIR);
    let node = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(node, "node is needed for the socket.io-client test (or set OWLERY_SKIP_NODE=1 to skip it)");
    assert!(
        dir.join("node_modules/socket.io-client").exists(),
        "socket.io-client is not installed in {}: run ./test.sh (it runs npm ci there), or set OWLERY_SKIP_NODE=1",
        dir.display()
    );
    dir
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(owlery_skip_node, ignore = "SKIPPED: OWLERY_SKIP_NODE=1")]
async fn the_real_socket_io_client_receives_broadcasts() {
    let node_dir = node_packages();
    // The script sits beside node_modules, so that `require` finds the installed client.
    let dir = tempfile::Builder::new().prefix(".client-").tempdir_in(node_dir).unwrap();
    std::fs::write(dir.path().join("client.js"), CLIENT).unwrap();

    let host = Host::with_plugins(&[shipped("ws-broadcast")]);
    // One broadcast from before the client connects: it asks to resume from before it.
    host.post_events(&event("incident.created", json!({"id": 1}))).await;
    host.caught_up("ws-broadcast").await;

    let mut client = Command::new("node")
        .arg("client.js")
        .args([host.base.as_str(), "incident:42", "-1", "3"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("connected"), "{first}");
    // Three incidents, so three partitions, which may be handled in any order: each is
    // handled before the next is published.
    for (event_type, id) in [("incident.updated", 7), ("incident.updated", 42), ("incident.created", 2)] {
        let e = json!({"eventType": event_type, "userId": "reporter-1", "source": "test", "data": {"id": id}});
        assert_eq!(host.post_events(&e).await.0, 201);
        host.caught_up("ws-broadcast").await;
    }
    let status = tokio::task::spawn_blocking(move || client.wait()).await.unwrap().unwrap();
    let out = lines.next().expect("the client prints what it got").unwrap();
    assert!(status.success(), "{out}");
    let got: Vec<Value> = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = got.iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["incident:created", "incident:updated", "incident:created"], "{got:?}");
    assert_eq!(got[0]["id"], 1, "the missed broadcast comes first");
    assert_eq!(got[1]["room"], "incident:42");
    assert_eq!(got[1]["id"], 42, "not incident:7's update");
    assert_eq!(got[2]["id"], 2);
}

/// Steps against a host with small limits, one JSON line per finding; `publish` lines ask
/// the test to publish, and it answers on stdin when it has.
const LIMITS_CLIENT: &str = r#"
const { io } = require("socket.io-client");
const readline = require("readline");
const url = process.argv[2];
const lines = readline.createInterface({ input: process.stdin });
const published = [];
lines.on("line", () => { const r = published.shift(); if (r) r(); });
const say = (o) => console.log(JSON.stringify(o));
const connect = (auth) => io(url, { auth, transports: ["websocket"], reconnection: false, forceNew: true });
const once = (socket, names, ms = 10000) => new Promise((resolve) => {
  const timer = setTimeout(() => resolve({ name: "timeout" }), ms);
  for (const name of names) socket.once(name, (data) => { clearTimeout(timer); resolve({ name, data }); });
});
const publish = (what) => new Promise((resolve) => { published.push(resolve); say({ publish: what }); });

(async () => {
  // Too many rooms at connect: an error, then the server disconnects.
  const greedy = connect({ rooms: ["a", "b", "c"] });
  // Both listeners first: the two packets may arrive in one read.
  const [refused, gone] = await Promise.all([once(greedy, ["error"]), once(greedy, ["disconnect"])]);
  say({ step: "rooms at connect", event: refused.name, error: refused.data && refused.data.error, then: gone.name });

  // Within the cap, then over it with subscribe: an error, and the socket stays.
  const main = connect({ rooms: ["incident:1"] });
  await once(main, ["connect"]);
  main.emit("subscribe", ["incident:2", "incident:3"]);
  const over = await once(main, ["error", "rooms"]);
  say({ step: "subscribe over the cap", event: over.name, error: over.data && over.data.error, connected: main.connected });

  // Unsubscribe: incident:1's broadcasts stop, room all's keep coming.
  main.emit("unsubscribe", ["incident:1"]);
  const left = await once(main, ["rooms"]);
  const got = [];
  main.onAny((name, payload, meta) => { if (meta && meta.offset !== undefined) got.push({ name, room: meta.room }); });
  await publish("incident.updated 1, then incident.created 9");
  await new Promise((r) => setTimeout(r, 1500));
  say({ step: "unsubscribe", left: left.data, got });

  // Connection cap: main is one client; two more fit, the fourth is refused.
  const second = connect({}); await once(second, ["connect"]);
  const third = connect({}); await once(third, ["connect"]);
  const fourth = connect({});
  const [full, fourthGone] = await Promise.all([once(fourth, ["error", "connect_error"]), once(fourth, ["disconnect"])]);
  say({ step: "max clients", event: full.name, error: full.data && full.data.error, then: fourthGone.name });
  second.close(); third.close(); fourth.close();

  // A message over ws_max_message_bytes ends the connection.
  main.emit("subscribe", ["x".repeat(4096)]);
  const cut = await once(main, ["disconnect"]);
  say({ step: "oversized message", event: cut.name, reason: cut.data });
  process.exit(0);
})();
setTimeout(() => { console.error("timed out"); process.exit(1); }, 60000);
"#;

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(owlery_skip_node, ignore = "SKIPPED: OWLERY_SKIP_NODE=1")]
async fn socket_io_clients_meet_the_same_limits_as_websocket_ones() {
    use std::io::Write;
    let node_dir = node_packages();
    let dir = tempfile::Builder::new().prefix(".client-").tempdir_in(node_dir).unwrap();
    std::fs::write(dir.path().join("limits.js"), LIMITS_CLIENT).unwrap();
    let config = "max_rooms_per_client = 2\nws_max_message_bytes = 1024\nmax_clients = 3\n";
    let host = Host::with_config(&[shipped("ws-broadcast")], config);

    let mut client = Command::new("node")
        .arg("limits.js")
        .arg(host.base.as_str())
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = client.stdin.take().unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    let mut steps = std::collections::HashMap::new();
    while let Some(Ok(line)) = tokio::task::block_in_place(|| lines.next()) {
        let said: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        if said.get("publish").is_some() {
            for e in [event("incident.updated", json!({"id": 1})), event("incident.created", json!({"id": 9}))] {
                assert_eq!(host.post_events(&e).await.0, 201);
            }
            host.caught_up("ws-broadcast").await;
            writeln!(stdin, "done").unwrap();
            continue;
        }
        steps.insert(said["step"].as_str().unwrap().to_owned(), said);
    }
    let status = client.wait().unwrap();
    assert!(status.success(), "{steps:?}");

    let step = |name: &str| steps.get(name).unwrap_or_else(|| panic!("no step {name}: {steps:?}")).clone();
    let at_connect = step("rooms at connect");
    assert_eq!(at_connect["event"], "error", "{at_connect}");
    assert!(at_connect["error"].as_str().unwrap().contains("at most 2 rooms"), "{at_connect}");
    assert_eq!(at_connect["then"], "disconnect");

    let over = step("subscribe over the cap");
    assert_eq!(over["event"], "error", "{over}");
    assert!(over["error"].as_str().unwrap().contains("at most 2 rooms"), "{over}");
    assert_eq!(over["connected"], true);

    let unsubscribe = step("unsubscribe");
    assert_eq!(unsubscribe["left"], json!(["incident:1"]));
    assert_eq!(unsubscribe["got"], json!([{"name": "incident:created", "room": "all"}]), "{unsubscribe}");

    let full = step("max clients");
    assert_eq!(full["event"], "error", "{full}");
    assert!(full["error"].as_str().unwrap().contains("too many clients"), "{full}");
    assert_eq!(full["then"], "disconnect");

    let oversized = step("oversized message");
    assert_eq!(oversized["event"], "disconnect", "{oversized}");
}

/// A Socket.IO client over a raw WebSocket (engine.io v4 frames) whose TCP receive buffer is
/// tiny and who does not read until told: what a browser tab on a bad link looks like.
pub async fn raw_socket_io_client(
    host: &Host,
    auth: &Value,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(host.base.trim_start_matches("http://").parse().unwrap()).await.unwrap();
    let url = format!("{}/socket.io/?EIO=4&transport=websocket", host.base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await.expect("the raw client connects");
    let open = ws.next().await.unwrap().unwrap();
    assert!(open.to_text().unwrap().starts_with('0'), "engine.io open: {open:?}");
    ws.send(Message::Text(format!("40{auth}").into())).await.unwrap();
    loop {
        let message = ws.next().await.unwrap().unwrap();
        match message.to_text().unwrap() {
            // engine.io ping: pong.
            "2" => ws.send(Message::Text("3".into())).await.unwrap(),
            text if text.starts_with("40") => return ws,
            other => panic!("expected socket.io's connect, got {other:?}"),
        }
    }
}

/// What a raw client reads until its connection ends: each event's `data.n`, and whether
/// the server said disconnect (`41`).
pub async fn read_until_disconnected(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) -> (Vec<u64>, bool) {
    use futures_util::StreamExt;
    let mut ns = Vec::new();
    loop {
        let message = match tokio::time::timeout(std::time::Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(_) => return (ns, false),
            Err(_) => panic!("neither more frames nor a disconnect in 30 s, after {} events", ns.len()),
        };
        let Ok(text) = message.to_text() else { continue };
        if text == "41" {
            return (ns, true);
        }
        if let Some(array) = text.strip_prefix("42") {
            let event: Value = serde_json::from_str(array).unwrap();
            if let Some(n) = event[1]["data"]["n"].as_u64() {
                ns.push(n);
            }
        }
    }
}

fn numbered(n: u64, blob: &str) -> Value {
    // One incident: one partition, so one order.
    json!({"eventType": "incident.created", "userId": "one-reporter", "source": "test",
           "data": {"id": 1, "n": n, "blob": blob}})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_socket_io_client_is_disconnected_never_left_with_a_gap() {
    slow_socket_io_client_is_cut_off("client_queue = 16\nsocket_send_buffer = 4096\n", 2048).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_socket_io_client_queue_is_bounded_in_bytes_as_well_as_frames() {
    let config = "client_queue = 100000\nclient_queue_bytes = 65536\nsocket_send_buffer = 4096\n";
    slow_socket_io_client_is_cut_off(config, 8192).await;
}

/// A client that does not read while 300 broadcasts of about `blob` bytes go out gets a
/// gapless prefix of them, then a disconnect.
async fn slow_socket_io_client_is_cut_off(config: &str, blob: usize) {
    let host = Host::with_config(&[shipped("ws-broadcast")], config);
    let mut slow = raw_socket_io_client(&host, &json!({})).await;
    let blob = "x".repeat(blob);
    for chunk in 0..10u64 {
        let batch: Vec<Value> = (chunk * 30..(chunk + 1) * 30).map(|n| numbered(n, &blob)).collect();
        assert_eq!(host.post_events(&json!(batch)).await.0, 201);
    }
    host.caught_up("ws-broadcast").await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (ns, disconnected) = read_until_disconnected(&mut slow).await;
    assert!(disconnected, "a client that missed broadcasts is told so by a disconnect (got {} events)", ns.len());
    assert!(ns.len() < 300, "it fell behind: {}", ns.len());
    assert_eq!(ns, (0..ns.len() as u64).collect::<Vec<_>>(), "what it got has no gap");
    assert!(host.log().contains("disconnecting a Socket.IO client that fell too far behind"));
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_io_catch_up_waits_for_a_slow_reader_instead_of_dropping() {
    let config = "client_queue = 16\nsocket_send_buffer = 4096\n";
    let host = Host::with_config(&[shipped("ws-broadcast")], config);
    let blob = "x".repeat(2048);
    for chunk in 0..10u64 {
        let batch: Vec<Value> = (chunk * 30..(chunk + 1) * 30).map(|n| numbered(n, &blob)).collect();
        assert_eq!(host.post_events(&json!(batch)).await.0, 201);
    }
    host.caught_up("ws-broadcast").await;
    // Resumes from the start, reading slowly: every missed broadcast arrives, in order.
    let mut client = raw_socket_io_client(&host, &json!({"since": -1})).await;
    let mut ns = Vec::new();
    while ns.len() < 300 {
        use futures_util::StreamExt;
        let message = tokio::time::timeout(std::time::Duration::from_secs(30), client.next())
            .await
            .unwrap_or_else(|_| panic!("catch-up stopped after {} events", ns.len()))
            .expect("the connection stays open")
            .unwrap();
        let Ok(text) = message.to_text() else { continue };
        assert_ne!(text, "41", "disconnected during catch-up after {} events", ns.len());
        if let Some(array) = text.strip_prefix("42") {
            let event: Value = serde_json::from_str(array).unwrap();
            if let Some(n) = event[1]["data"]["n"].as_u64() {
                ns.push(n);
                if ns.len() % 50 == 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
    }
    assert_eq!(ns, (0..300).collect::<Vec<_>>());
}
