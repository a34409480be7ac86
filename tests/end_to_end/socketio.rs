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
