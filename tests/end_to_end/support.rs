//! Test glue: a real `owlery` process on a free port with its own temp directories (started
//! through `owlery_testkit`'s harness, which `owlery bench` shares), real plugins copied into
//! its plugins directory, an HTTP client and WebSocket clients.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use owlery_testkit::{HostProcess, IggyServer};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

pub use owlery_test_guests as guests;

pub struct Host {
    /// Declared before `dir`: the process goes before its directory does.
    process: HostProcess,
    pub dir: tempfile::TempDir,
    pub base: String,
    pub http: reqwest::Client,
}

impl Host {
    /// A host running the three shipped plugins with their shipped manifests.
    pub fn with_shipped_plugins() -> Host {
        Host::with_plugins(&[shipped("ws-broadcast"), shipped("analytics"), shipped("alerts")])
    }

    /// A host with the given (name, wasm path, manifest text) plugins.
    pub fn with_plugins(plugins: &[(String, PathBuf, String)]) -> Host {
        Host::with_env(plugins, Vec::new())
    }

    /// A host on an Iggy server instead of the embedded log.
    pub fn on_iggy(iggy: &IggyServer, plugins: &[(String, PathBuf, String)]) -> Host {
        Host::on_iggy_with(iggy, plugins, &[])
    }

    /// A host on an Iggy server with more environment (`OWLERY_CLUSTER_SECRET`, say).
    pub fn on_iggy_with(iggy: &IggyServer, plugins: &[(String, PathBuf, String)], env: &[(&str, &str)]) -> Host {
        let mut all = iggy.host_env();
        // Eight partitions rather than the default one: the tests then also cover what only
        // several can get wrong (each partition's order and offsets, shared reads, lanes).
        // `env` can set another count (set later, it wins).
        all.push(("OWLERY_IGGY_PARTITIONS".to_owned(), "8".to_owned()));
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Host::with_env(plugins, all)
    }

    /// A host whose working directory holds `owlery.toml` with this text.
    pub fn with_config(plugins: &[(String, PathBuf, String)], owlery_toml: &str) -> Host {
        Host::with_files(plugins, Vec::new(), Some(owlery_toml))
    }

    /// A host with `owlery.toml` and more environment.
    pub fn with_config_and_env(plugins: &[(String, PathBuf, String)], owlery_toml: &str, env: &[(&str, &str)]) -> Host {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Host::with_files(plugins, env, Some(owlery_toml))
    }

    /// A host on an Iggy server configured only with where Iggy is (the default partitions).
    pub fn on_iggy_as_configured(iggy: &IggyServer, plugins: &[(String, PathBuf, String)]) -> Host {
        Host::with_env(plugins, iggy.host_env())
    }

    fn with_env(plugins: &[(String, PathBuf, String)], env: Vec<(String, String)>) -> Host {
        Host::with_files(plugins, env, None)
    }

    fn with_files(
        plugins: &[(String, PathBuf, String)],
        env: Vec<(String, String)>,
        owlery_toml: Option<&str>,
    ) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let process = HostProcess::new(env!("CARGO_BIN_EXE_owlery"), dir.path()).unwrap().env(env);
        if let Some(text) = owlery_toml {
            process.write_config(text).unwrap();
        }
        for (name, wasm, manifest) in plugins {
            process.add_plugin(name, wasm, Some(manifest)).unwrap();
        }
        let mut host = Host { process, dir, base: String::new(), http: reqwest::Client::new() };
        host.start();
        host
    }

    /// Start the binary (again) on the same directories; waits until it listens.
    pub fn start(&mut self) {
        self.base = self.process.start().unwrap_or_else(|e| panic!("{}", owlery_testkit::host::tail(&e.to_string())));
    }

    /// `kill -9`: no shutdown, no flush.
    pub fn kill9(&mut self) {
        self.process.kill9().unwrap();
    }

    /// Write `owlery.toml` (read at the next `start`).
    pub fn write_config(&self, owlery_toml: &str) {
        self.process.write_config(owlery_toml).unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(status) = self.process.stop().unwrap() {
            assert!(status.success(), "owlery exited with {status} on SIGTERM; log:\n{}", self.log());
        }
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The running binary's process id.
    pub fn pid(&self) -> u32 {
        self.process.id().expect("owlery is running")
    }

    /// SIGTERM, then wait up to `limit` for the process to exit: how long it took and how it
    /// exited, or `None` if it was still running at `limit` (it is then killed with -9).
    pub fn terminate(&mut self, limit: Duration) -> (Duration, Option<std::process::ExitStatus>) {
        self.process.terminate(limit).unwrap()
    }

    /// The process's resident memory now and at its peak, in bytes (`VmRSS`, `VmHWM` of
    /// /proc/PID/status).
    pub fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| -> u64 {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}"));
            let kib: u64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().unwrap();
            kib << 10
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// The end of the log, for failure messages: a test of a plugin that floods the log
    /// must not flood the test's output.
    pub fn log_tail(&self) -> String {
        owlery_testkit::host::tail(&self.log())
    }

    /// `PUT /api/plugins/{name}` of a component, with its manifest if given.
    pub fn upload(&self, name: &str, wasm: Vec<u8>, manifest: Option<&str>) -> reqwest::RequestBuilder {
        let request = self
            .http
            .put(self.url(&format!("/api/plugins/{name}")))
            .header("content-type", "application/wasm")
            .body(wasm);
        match manifest {
            Some(manifest) => request.query(&[("manifest", manifest)]),
            None => request,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post_events(&self, body: &Value) -> (u16, Value) {
        self.post_json("/api/events", body).await
    }

    /// POST a JSON body to `path`.
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self.http.post(self.url(path)).json(body).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(&self, body: &str) -> (u16, Value) {
        let response = self
            .http
            .post(self.url("/api/events"))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Every record of a topic, all partitions.
    /// GET, asking again while the host answers 503 (its log is reconnecting), for up to a minute.
    pub async fn get_available(&self, path: &str) -> (u16, Value) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = self.get(path).await;
            if status != 503 || Instant::now() > deadline {
                return (status, body);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn topic_records(&self, topic: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let (status, first) =
            self.get_available(&format!("/api/events/replay?topic={topic}&fromOffset=0&limit=10000")).await;
        assert_eq!(status, 200, "{first}");
        all.extend(first["records"].as_array().unwrap().iter().cloned());
        // A page may stop short of the end (Iggy after a restart): read each partition on
        // from its `next` until nothing more comes, as a client paging through would.
        for (partition, next) in first["next"].as_object().unwrap() {
            let mut from = next.as_u64().unwrap();
            loop {
                let (status, page) = self
                    .get_available(&format!(
                        "/api/events/replay?topic={topic}&partition={partition}&fromOffset={from}&limit=10000"
                    ))
                    .await;
                assert_eq!(status, 200, "{page}");
                let records = page["records"].as_array().unwrap();
                if records.is_empty() {
                    break;
                }
                all.extend(records.iter().cloned());
                from = page["next"][partition].as_u64().unwrap();
            }
        }
        all
    }

    pub async fn query(&self, plugin: &str, query: &str) -> Value {
        let (status, body) = self.get(&format!("/api/plugins/{plugin}/query{query}")).await;
        assert_eq!(status, 200, "query {plugin}: {body}");
        body
    }

    /// The Prometheus text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        self.http.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap()
    }

    pub async fn plugin(&self, name: &str) -> Value {
        let (status, body) = self.get(&format!("/api/plugins/{name}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Wait until the plugin has read everything in its topics (lag 0).
    pub async fn caught_up(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.plugin(name).await;
            if status["lag"] == 0 && status["state"] == "running" {
                return;
            }
            assert!(Instant::now() < deadline, "{name} never caught up: {status}\nlog:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn ws(&self, query: &str) -> Ws {
        let url = format!("{}/ws{query}", self.base.replace("http://", "ws://"));
        let (stream, _) = tokio_tungstenite::connect_async(url).await.expect("websocket connects");
        let mut ws = Ws { stream, welcome: Value::Null };
        let hello = ws.next_json(Duration::from_secs(5)).await.expect("welcome frame");
        assert_eq!(hello["type"], "welcome", "{hello}");
        ws.welcome = hello;
        ws
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.process.kill9();
        if std::thread::panicking() {
            eprintln!("--- owlery log ---\n{}", self.log_tail());
        }
    }
}

/// (name, built wasm, manifest text) of a shipped plugin.
pub fn shipped(name: &str) -> (String, PathBuf, String) {
    let wasm = match name {
        "ws-broadcast" => guests::WS_BROADCAST,
        "analytics" => guests::ANALYTICS,
        "alerts" => guests::ALERTS,
        other => panic!("no shipped plugin {other}"),
    };
    let manifest = std::fs::read_to_string(Path::new(guests::PLUGINS_DIR).join(format!("{name}.toml"))).unwrap();
    (name.to_owned(), PathBuf::from(wasm), manifest)
}

pub struct Ws {
    stream: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    /// The welcome frame: rooms, next offset, epoch.
    pub welcome: Value,
}

impl Ws {
    /// The next JSON text frame, or None if nothing arrives within `timeout`.
    pub async fn next_json(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, self.stream.next()).await.ok()??.ok()?;
            if let Message::Text(text) = message {
                return Some(serde_json::from_str(text.as_str()).unwrap());
            }
        }
    }

    /// The next broadcast frame (skipping control replies).
    pub async fn next_event(&mut self, timeout: Duration) -> Option<Value> {
        loop {
            let frame = self.next_json(timeout).await?;
            if frame.get("offset").is_some() && frame.get("room").is_some() {
                return Some(frame);
            }
        }
    }

    /// The next broadcast frame of `room`.
    pub async fn next_in_room(&mut self, room: &str, timeout: Duration) -> Option<Value> {
        loop {
            let frame = self.next_event(timeout).await?;
            if frame["room"] == room {
                return Some(frame);
            }
        }
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.stream.send(Message::Text(value.to_string().into())).await.unwrap();
    }
}

pub fn event(event_type: &str, data: Value) -> Value {
    serde_json::json!({"eventType": event_type, "source": "test", "data": data})
}

/// An update of incident 5 by one reporter (so all of them share a partition), `data.n` = `n`.
pub fn reporter_5_update(n: Value) -> Value {
    let mut e = event("incident.updated", serde_json::json!({"id": 5, "n": n}));
    e["userId"] = serde_json::json!("reporter-5");
    e
}

/// `count` such updates, numbered from 0.
pub fn reporter_5_updates(count: u64) -> Vec<Value> {
    (0..count).map(|n| reporter_5_update(n.into())).collect()
}
