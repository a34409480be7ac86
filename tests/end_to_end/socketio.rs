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
socket.onAny((name, frame) => {
  got.push({ name, room: frame.room, offset: frame.offset, id: frame.event && frame.event.data && frame.event.data.id });
  if (got.length >= Number(want)) { console.log(JSON.stringify(got)); process.exit(0); }
});
setTimeout(() => { console.error("timed out with " + JSON.stringify(got)); process.exit(1); }, 30000);
"#;

/// The npm packages `./test.sh` installs (`npm ci` in tests/node); panics, saying so, when
/// they are not there.
fn node_packages() -> &'static Path {
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
    // One user, so one partition: events of different partitions may be handled in any order.
    for (event_type, id) in [("incident.updated", 7), ("incident.updated", 42), ("incident.created", 2)] {
        let e = json!({"eventType": event_type, "userId": "reporter-1", "source": "test", "data": {"id": id}});
        assert_eq!(host.post_events(&e).await.0, 201);
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
  main.onAny((name, frame) => { if (frame && frame.offset !== undefined) got.push({ name, room: frame.room }); });
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
