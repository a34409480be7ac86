//! `owlery bench`: measures Owlery in one run on this machine and prints a table (and, with
//! `--json FILE`, the same figures as JSON, one key each). Where there is a natural
//! comparison (native code, Iggy's own HTTP API) it is printed as a ratio beside it.
//!
//! Plugin dispatch runs in this process; everything else runs against real `owlery serve`
//! processes (and a real Iggy server when one is found) over HTTP and WebSocket.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::envelope::{Envelope, Routing};
use crate::iggy_server::IggyServer;
use crate::log::Record;
use crate::plugins::runner::guest_from_record;
use crate::runtime::{Capabilities, InstanceContext, Runtime};
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Run every case briefly (checks the benchmark works; figures are rough).
    #[arg(long)]
    pub quick: bool,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run only these cases (repeatable): dispatch, publish, end-to-end, replay, hot-swap,
    /// fan-out (footprint is measured with end-to-end).
    #[arg(long, value_parser = ["dispatch", "publish", "end-to-end", "replay", "hot-swap", "fan-out"])]
    pub only: Vec<String>,
    /// Events per `handle` call in the dispatch cases.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// WebSocket clients in the fan-out case.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Events per second in the end-to-end and fan-out cases.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Where the built plugins are (`NAME.wasm`, or `NAME_WITH_UNDERSCORES.wasm`).
    #[arg(long, default_value = "plugins/target/wasm32-wasip2/release")]
    pub wasm_dir: PathBuf,
    /// Where the plugins' manifests are.
    #[arg(long, default_value = "plugins")]
    pub manifest_dir: PathBuf,
    /// The Iggy server binary for the Iggy cases [default: IGGY_SERVER_BIN,
    /// ../shared/iggy/iggy-server, PATH]; without one those cases are skipped, and say so.
    #[arg(long)]
    pub iggy_server: Option<PathBuf>,
}

/// The figures of one run.
#[derive(Default)]
struct Report {
    rows: Vec<(String, String, String)>,
    figures: BTreeMap<String, Value>,
}

impl Report {
    fn add(&mut self, key: &str, label: &str, value: f64, unit: &str, compare: String) {
        let shown = if value >= 100.0 { format!("{value:.0} {unit}") } else { format!("{value:.2} {unit}") };
        println!("{label:<58} {shown:>22}   {compare}");
        self.rows.push((label.to_owned(), shown, compare));
        self.figures.insert(key.to_owned(), json!((value * 100.0).round() / 100.0));
    }

    fn note(&mut self, key: &str, text: &str) {
        println!("{:<58} {:>22}   {text}", key, "-");
        self.figures.insert(key.to_owned(), Value::String(text.to_owned()));
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 { format!("{:.2}x", a / b) } else { "-".into() }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v
}

fn wasm_path(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    for candidate in [name.to_owned(), name.replace('-', "_")] {
        let path = dir.join(format!("{candidate}.wasm"));
        if path.exists() {
            return Ok(path);
        }
    }
    bail!("{name}.wasm is not in {} (build the plugins first, e.g. ./demo.sh, or pass --wasm-dir)", dir.display())
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut report = Report::default();
    println!("Owlery benchmark — {} cores, {}{}", num_cpus(), machine(), if args.quick { " (--quick)" } else { "" });
    println!("{:<58} {:>22}   compared", "case", "figure");
    let wanted = |case: &str| args.only.is_empty() || args.only.iter().any(|c| c == case);
    if wanted("dispatch") {
        dispatch(&args, &mut report)?;
    }
    let iggy = find_iggy(&args);
    if wanted("publish") {
        publish(&args, &mut report, iggy.as_deref()).await?;
    }
    if wanted("end-to-end") {
        end_to_end(&args, &mut report, iggy.as_deref()).await?;
    }
    if wanted("replay") {
        replay(&args, &mut report).await?;
    }
    if wanted("hot-swap") {
        hot_swap(&args, &mut report).await?;
    }
    if wanted("fan-out") {
        fan_out(&args, &mut report).await?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.figures)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn machine() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

/// Stored envelopes as the log holds them.
fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let severity = ["LOW", "HIGH", "CRITICAL"][i % 3];
            let event_type = ["incident.created", "incident.updated", "comment.added", "incident.resolved"][i % 4];
            let envelope = Envelope::from_producer(json!({
                "eventType": event_type,
                "source": "bench",
                "userId": format!("user-{}", i % 50),
                "data": {"id": i % 500, "severity": severity, "location": format!("site-{}", i % 20), "title": "Forklift blocking aisle 7"},
            }))
            .expect("valid");
            Record { partition: 0, offset: i as u64, payload: envelope.to_bytes() }
        })
        .collect()
}

/// The analytics plugin's logic, natively, for the comparison.
#[derive(Default)]
struct NativeCounts {
    total: u64,
    by_type: BTreeMap<String, u64>,
    by_source: BTreeMap<String, u64>,
    by_severity: BTreeMap<String, u64>,
    per_minute: BTreeMap<String, u64>,
    open: BTreeMap<String, String>,
}

impl NativeCounts {
    fn apply(&mut self, e: &Envelope) {
        self.total += 1;
        *self.by_type.entry(e.event_type.clone()).or_default() += 1;
        *self.by_source.entry(e.source.clone()).or_default() += 1;
        if let Some(minute) = e.timestamp.get(..16) {
            *self.per_minute.entry(minute.to_owned()).or_default() += 1;
        }
        // The plugin sees `data` as JSON text and parses it; so does this.
        let data: Value = serde_json::from_str(&e.data.to_string()).unwrap_or_default();
        if let Some(s) = data.get("severity").and_then(|s| s.as_str()) {
            *self.by_severity.entry(s.to_owned()).or_default() += 1;
        }
        let id = data.get("id").map(|v| v.to_string());
        match (e.event_type.as_str(), id) {
            ("incident.created", Some(id)) => {
                self.open.insert(id, data["severity"].as_str().unwrap_or("UNKNOWN").to_owned());
            }
            ("incident.resolved", Some(id)) => {
                self.open.remove(&id);
            }
            _ => {}
        }
    }
}

/// Case 1: events/s through a plugin vs the same logic natively, from stored bytes (what
/// the runner does per event: decode, convert, call).
fn dispatch(args: &BenchArgs, report: &mut Report) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let runtime = Runtime::new(&dir.path().join("cache"))?;
    let store = Arc::new(Store::open(dir.path(), 1000, Duration::ZERO)?);
    let cx = InstanceContext {
        plugin: "bench".into(),
        namespace: "bench".into(),
        caps: Arc::new(Capabilities { broadcast: true, publish: Vec::new(), state: true, memory_bytes: 256 << 20 }),
        store,
        routing: Arc::new(Routing::default()),
    };
    let total = if args.quick { 20_000 } else { 1_000_000 };
    let batch = args.batch.max(1);
    let input = records(batch * 16);
    for (name, key) in [("noop", "noop"), ("analytics", "analytics")] {
        let wasm = std::fs::read(wasm_path(&args.wasm_dir, name)?)?;
        let component = runtime.load(&wasm)?;
        let mut instance = component.instantiate(&runtime, &cx).map_err(|e| anyhow::anyhow!("{e}"))?;
        instance.init("{}", Duration::from_secs(5)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let started = Instant::now();
        let mut done = 0;
        while done < total {
            for chunk in input.chunks(batch) {
                let guests: std::sync::Arc<[_]> =
                    chunk.iter().map(|r| guest_from_record("t", r).expect("valid").1).collect();
                instance.handle(&guests, Duration::from_secs(5)).map_err(|e| anyhow::anyhow!("{e}"))?;
                done += chunk.len();
            }
        }
        let wasm_rate = done as f64 / started.elapsed().as_secs_f64();

        let mut counts = NativeCounts::default();
        let started = Instant::now();
        let mut done = 0;
        while done < total {
            for r in &input {
                let envelope = Envelope::from_bytes(&r.payload).expect("valid");
                if name == "analytics" {
                    counts.apply(&envelope);
                } else {
                    std::hint::black_box(&envelope);
                }
                done += 1;
            }
        }
        std::hint::black_box(counts.total);
        let native_rate = done as f64 / started.elapsed().as_secs_f64();
        report.add(
            &format!("dispatch.{key}.wasm_events_per_sec"),
            &format!("dispatch {name}: wasm plugin, batch {batch}"),
            wasm_rate,
            "events/s",
            format!("{} of native", ratio(wasm_rate, native_rate)),
        );
        report.add(
            &format!("dispatch.{key}.wasm_ns_per_event"),
            &format!("dispatch {name}: wasm, per event"),
            1e9 / wasm_rate,
            "ns",
            String::new(),
        );
        report.add(
            &format!("dispatch.{key}.native_events_per_sec"),
            &format!("dispatch {name}: native Rust handler"),
            native_rate,
            "events/s",
            String::new(),
        );
    }
    Ok(())
}

fn find_iggy(args: &BenchArgs) -> Option<PathBuf> {
    args.iggy_server.clone().or_else(crate::iggy_server::find_binary)
}

/// An `owlery serve` child process with the named plugins.
struct HostProcess {
    child: Child,
    base: String,
    dir: tempfile::TempDir,
}

impl HostProcess {
    fn start(args: &BenchArgs, plugins: &[&str], iggy: Option<&IggyServer>) -> anyhow::Result<HostProcess> {
        let dir = tempfile::tempdir()?;
        let plugin_dir = dir.path().join("plugins");
        std::fs::create_dir_all(&plugin_dir)?;
        for name in plugins {
            std::fs::copy(wasm_path(&args.wasm_dir, name)?, plugin_dir.join(format!("{name}.wasm")))?;
            let manifest = args.manifest_dir.join(format!("{name}.toml"));
            if manifest.exists() {
                std::fs::copy(&manifest, plugin_dir.join(format!("{name}.toml")))?;
            }
        }
        let mut command = Command::new(std::env::current_exe()?);
        let host_log = std::env::var("OWLERY_BENCH_HOST_LOG").ok();
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--plugins-dir")
            .arg(&plugin_dir)
            // OWLERY_BENCH_HOST_LOG=<filter> shows the hosts' logs (with that RUST_LOG filter).
            .env("RUST_LOG", host_log.as_deref().unwrap_or("warn"))
            .env_remove("OWLERY_CONFIG")
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(if host_log.is_some() { Stdio::inherit() } else { Stdio::null() });
        if let Some(iggy) = iggy {
            command.args(["--log", "iggy", "--iggy-host", "127.0.0.1", "--iggy-port", &iggy.tcp_port.to_string()]);
        } else {
            command.args(["--log", "embedded"]);
        }
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(address) = line.strip_prefix("owlery listening on ") {
                    let _ = tx.send(address.to_owned());
                }
            }
        });
        let base = rx.recv_timeout(Duration::from_secs(60)).context("owlery serve did not start")?;
        Ok(HostProcess { child, base, dir })
    }

    fn rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    async fn plugin(&self, http: &reqwest::Client, name: &str) -> anyhow::Result<Value> {
        Ok(http.get(format!("{}/api/plugins/{name}", self.base)).send().await?.json().await?)
    }

    async fn wait_caught_up(&self, http: &reqwest::Client, name: &str, processed: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let status = self.plugin(http, name).await?;
            if status["lag"] == 0 && status["processed"].as_u64().unwrap_or(0) >= processed {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{name} did not catch up: {status}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

fn bench_event(i: u64) -> Value {
    json!({"eventType": "incident.created", "source": "bench", "userId": format!("user-{}", i % 50), "data": {"id": i, "severity": "LOW", "location": "site-1"}})
}

/// Post single events from `clients` concurrent connections; (latencies ms, events/s).
async fn load(
    requests: usize,
    clients: usize,
    send: impl Fn(reqwest::Client, u64) -> futures_util::future::BoxFuture<'static, anyhow::Result<()>>
    + Send
    + Sync
    + 'static,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let send = Arc::new(send);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let send = send.clone();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut latencies = Vec::new();
            for i in 0..requests / clients {
                let t = Instant::now();
                send(http.clone(), (c * 1_000_000 + i) as u64).await?;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    Ok((sorted(all), rate))
}

fn owlery_sender(
    base: String,
) -> impl Fn(reqwest::Client, u64) -> futures_util::future::BoxFuture<'static, anyhow::Result<()>> {
    move |http, i| {
        let url = format!("{base}/api/events");
        Box::pin(async move {
            let response = http.post(url).json(&bench_event(i)).send().await?;
            if response.status().as_u16() != 201 {
                bail!("publish answered {}", response.status());
            }
            Ok(())
        })
    }
}

/// Case 2: HTTP publish latency and throughput, embedded and Iggy, and Iggy's own HTTP API.
async fn publish(args: &BenchArgs, report: &mut Report, iggy_bin: Option<&Path>) -> anyhow::Result<()> {
    let (requests, clients) = if args.quick { (400, 4) } else { (20_000, 16) };
    let host = HostProcess::start(args, &[], None)?;
    let (lat, rate) = load(requests, clients, owlery_sender(host.base.clone())).await?;
    report.add("publish.embedded.p50_ms", "publish embedded: latency p50", percentile(&lat, 0.5), "ms", String::new());
    report.add("publish.embedded.p99_ms", "publish embedded: latency p99", percentile(&lat, 0.99), "ms", String::new());
    report.add(
        "publish.embedded.p999_ms",
        "publish embedded: latency p99.9",
        percentile(&lat, 0.999),
        "ms",
        String::new(),
    );
    report.add("publish.embedded.events_per_sec", "publish embedded: throughput", rate, "events/s", String::new());
    drop(host);

    let Some(bin) = iggy_bin else {
        report
            .note("publish.iggy", "skipped: no iggy-server found (IGGY_SERVER_BIN, ../shared/iggy/iggy-server, PATH)");
        return Ok(());
    };
    let iggy = IggyServer::start_binary(bin, true)?;
    let host = HostProcess::start(args, &[], Some(&iggy))?;
    let (lat, owlery_rate) = load(requests, clients, owlery_sender(host.base.clone())).await?;

    // Iggy's own HTTP API, same load, same stream and topic, same payload, once the host
    // has created the topic there.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status: Value = http.get(format!("{}/api/monitoring/iggy-status", host.base)).send().await?.json().await?;
        if status["connected"] == true && status["topics"]["events"].is_object() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the host never created its topics in Iggy: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let login: Value = http
        .post(format!("http://127.0.0.1:{}/users/login", iggy.http_port))
        .json(&json!({"username": "iggy", "password": "iggy"}))
        .send()
        .await?
        .json()
        .await?;
    let token = login["access_token"]["token"].as_str().context("Iggy login")?.to_owned();
    let url = format!("http://127.0.0.1:{}/streams/owlery/topics/events/messages", iggy.http_port);
    let (iggy_lat, iggy_rate) = load(requests, clients, move |http, i| {
        let (url, token) = (url.clone(), token.clone());
        Box::pin(async move {
            let encode = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
            let payload = encode(&serde_json::to_vec(&bench_event(i))?);
            let body = json!({"partitioning": {"kind": "partition_id", "value": encode(&0u32.to_le_bytes())}, "messages": [{"id": 0, "payload": payload}]});
            let response = http.post(url).bearer_auth(token).json(&body).send().await?;
            if !response.status().is_success() {
                bail!("Iggy HTTP answered {}", response.status());
            }
            Ok(())
        })
    })
    .await?;
    report.add(
        "publish.iggy.p50_ms",
        "publish iggy: latency p50",
        percentile(&lat, 0.5),
        "ms",
        format!("Iggy HTTP p50 {:.2} ms", percentile(&iggy_lat, 0.5)),
    );
    report.add(
        "publish.iggy.p99_ms",
        "publish iggy: latency p99",
        percentile(&lat, 0.99),
        "ms",
        format!("Iggy HTTP p99 {:.2} ms", percentile(&iggy_lat, 0.99)),
    );
    report.add("publish.iggy.p999_ms", "publish iggy: latency p99.9", percentile(&lat, 0.999), "ms", String::new());
    report.add(
        "publish.iggy.events_per_sec",
        "publish iggy: throughput",
        owlery_rate,
        "events/s",
        format!("{} of Iggy's HTTP API", ratio(owlery_rate, iggy_rate)),
    );
    report.add(
        "publish.iggy_http.events_per_sec",
        "Iggy's own HTTP API: throughput",
        iggy_rate,
        "events/s",
        "baseline".into(),
    );
    report.add(
        "publish.iggy_http.p99_ms",
        "Iggy's own HTTP API: latency p99",
        percentile(&iggy_lat, 0.99),
        "ms",
        "baseline".into(),
    );
    Ok(())
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client, once the host has welcomed it: from then on it gets every broadcast
/// (connected without `since`, it gets only those made after that point).
async fn connect_ws(base: &str, query: &str) -> anyhow::Result<Ws> {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{}/ws{query}", base.replace("http://", "ws://"))).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(message))) if message.to_text().is_ok_and(|t| t.contains(r#""type":"welcome""#)) => {
                return Ok(ws);
            }
            Ok(Some(Ok(_))) => {}
            _ => bail!("the host did not welcome the WebSocket client"),
        }
    }
}

/// The `data.id` of a broadcast frame, if it is one.
fn frame_id(message: &tokio_tungstenite::tungstenite::Message) -> Option<u64> {
    let text = message.to_text().ok()?;
    let frame: Value = serde_json::from_str(text).ok()?;
    frame["event"]["data"]["id"].as_u64()
}

/// Publish at `rate`/s for `seconds`, one event per request; returns send instants by id.
async fn paced_publish(base: &str, rate: u32, seconds: f64, first_id: u64) -> anyhow::Result<HashMap<u64, Instant>> {
    let http = reqwest::Client::new();
    let total = (f64::from(rate) * seconds) as u64;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..total {
        tokio::time::sleep_until(started + interval * i as u32).await;
        let (http, url, sent) = (http.clone(), format!("{base}/api/events"), sent.clone());
        let id = first_id + i;
        tasks.push(tokio::spawn(async move {
            sent.lock().await.insert(id, Instant::now());
            let _ = http.post(url).json(&bench_event(id)).send().await;
        }));
    }
    for t in tasks {
        t.await?;
    }
    let sent = std::mem::take(&mut *sent.lock().await);
    Ok(sent)
}

/// Case 3: publish → ws-broadcast plugin → WebSocket client, at `rate` events/s.
async fn end_to_end(args: &BenchArgs, report: &mut Report, iggy_bin: Option<&Path>) -> anyhow::Result<()> {
    let seconds = if args.quick { 0.5 } else { 10.0 };
    let mut backends: Vec<(&str, Option<IggyServer>)> = vec![("embedded", None)];
    match iggy_bin {
        Some(bin) => backends.push(("iggy", Some(IggyServer::start_binary(bin, true)?))),
        None => report.note("e2e.iggy", "skipped: no iggy-server found"),
    }
    for (name, iggy) in backends {
        let host = HostProcess::start(args, &["ws-broadcast", "analytics", "alerts"], iggy.as_ref())?;
        let idle = host.rss_mb();
        let ws = connect_ws(&host.base, "").await?;
        let (_, mut read) = ws.split();
        let received = tokio::spawn(async move {
            let mut at = HashMap::new();
            let mut closed = None;
            while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(5), read.next()).await {
                if let Some(id) = frame_id(&message) {
                    at.insert(id, Instant::now());
                } else if let tokio_tungstenite::tungstenite::Message::Close(frame) = message {
                    closed = Some(frame.map_or_else(|| "closed".to_owned(), |f| format!("{} {}", f.code, f.reason)));
                }
            }
            (at, closed)
        });
        let sent = paced_publish(&host.base, args.rate, seconds, 1).await?;
        let busy = host.rss_mb();
        let (received, closed) = received.await?;
        let lat = sorted(
            sent.iter()
                .filter_map(|(id, t)| received.get(id).map(|r| r.duration_since(*t).as_secs_f64() * 1000.0))
                .collect(),
        );
        report.add(
            &format!("e2e.{name}.p50_ms"),
            &format!("end to end {name} at {}/s: p50", args.rate),
            percentile(&lat, 0.5),
            "ms",
            String::new(),
        );
        report.add(
            &format!("e2e.{name}.p99_ms"),
            &format!("end to end {name} at {}/s: p99", args.rate),
            percentile(&lat, 0.99),
            "ms",
            match closed {
                // The slow-client policy cut the client off: it would reconnect with `since`.
                Some(reason) => format!("{} of {} delivered, then closed: {reason}", lat.len(), sent.len()),
                None => format!("{} of {} delivered", lat.len(), sent.len()),
            },
        );
        if name == "embedded" {
            report.add(
                "footprint.idle_rss_mb",
                "footprint: resident memory idle, 3 plugins",
                idle,
                "MB",
                String::new(),
            );
            report.add("footprint.load_rss_mb", "footprint: resident memory under load", busy, "MB", String::new());
        }
    }
    Ok(())
}

/// Case 4: replaying a log through analytics from offset 0; 100 events to a resuming client.
async fn replay(args: &BenchArgs, report: &mut Report) -> anyhow::Result<()> {
    let events: u64 = if args.quick { 10_000 } else { 1_000_000 };
    let host = HostProcess::start(args, &["ws-broadcast"], None)?;
    let http = reqwest::Client::new();
    let chunk = 5_000;
    let mut next = 0;
    while next < events {
        let batch: Vec<Value> = (next..(next + chunk).min(events))
            .map(|i| json!({"eventType": "user.connected", "userId": format!("u{}", i % 1000), "data": {"n": i}}))
            .collect();
        let response = http.post(format!("{}/api/events", host.base)).json(&batch).send().await?;
        if response.status().as_u16() != 201 {
            bail!("prefill answered {}", response.status());
        }
        next += chunk;
    }
    let wasm = std::fs::read(wasm_path(&args.wasm_dir, "analytics")?)?;
    let manifest = std::fs::read_to_string(args.manifest_dir.join("analytics.toml")).unwrap_or_default();
    let started = Instant::now();
    let response = http
        .put(format!("{}/api/plugins/analytics", host.base))
        .query(&[("manifest", manifest)])
        .body(wasm)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("uploading analytics: {}", response.text().await?);
    }
    host.wait_caught_up(&http, "analytics", events).await?;
    let secs = started.elapsed().as_secs_f64();
    report.add(
        "replay.analytics_seconds",
        &format!("replay {events} events through analytics"),
        secs,
        "s",
        format!("{:.0} events/s", events as f64 / secs),
    );

    // 100 broadcasts missed by a client, then it resumes.
    let batch: Vec<Value> = (0..101).map(bench_event).collect();
    http.post(format!("{}/api/events", host.base)).json(&batch).send().await?;
    host.wait_caught_up(&http, "ws-broadcast", 101).await?;
    let started = Instant::now();
    let mut ws = connect_ws(&host.base, "?since=0").await?;
    let mut got = 0;
    while got < 100 {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(message))) if frame_id(&message).is_some() => got += 1,
            Ok(Some(Ok(_))) => {}
            _ => bail!("the resuming client got {got} of 100"),
        }
    }
    report.add(
        "replay.resume_100_ms",
        "resume: 100 missed events to a WebSocket client",
        started.elapsed().as_secs_f64() * 1000.0,
        "ms",
        String::new(),
    );
    Ok(())
}

/// Case 5: the longest pause in processing while analytics is replaced under load.
async fn hot_swap(args: &BenchArgs, report: &mut Report) -> anyhow::Result<()> {
    let host = HostProcess::start(args, &["analytics"], None)?;
    let http = reqwest::Client::new();
    let wasm = std::fs::read(wasm_path(&args.wasm_dir, "analytics")?)?;
    let base = host.base.clone();
    let seconds = if args.quick { 1.0 } else { 5.0 };
    let load = tokio::spawn(async move { paced_publish(&base, 2000, seconds, 1).await });
    let mut longest = 0u64;
    let mut compile = 0.0f64;
    for n in 0..if args.quick { 2 } else { 5 } {
        tokio::time::sleep(Duration::from_millis(150)).await;
        // A new version: the same component with a custom section appended.
        let mut version = wasm.clone();
        let name = b"owlery-bench";
        let body_len = 1 + name.len() + 4;
        version.extend_from_slice(&[0, body_len as u8, name.len() as u8]);
        version.extend_from_slice(name);
        version.extend_from_slice(&(n as u32).to_le_bytes());
        let started = Instant::now();
        let response = http.put(format!("{}/api/plugins/analytics", host.base)).body(version).send().await?;
        if !response.status().is_success() {
            bail!("swap: {}", response.text().await?);
        }
        compile = compile.max(started.elapsed().as_secs_f64() * 1000.0);
        let status = host.plugin(&http, "analytics").await?;
        longest = longest.max(status["lastSwapMicros"].as_u64().unwrap_or(0));
    }
    load.await??;
    report.add(
        "hot_swap.pause_ms",
        "hot swap: longest pause in processing",
        longest as f64 / 1000.0,
        "ms",
        String::new(),
    );
    report.add(
        "hot_swap.upload_ms",
        "hot swap: upload to swapped (compile off the hot path)",
        compile,
        "ms",
        String::new(),
    );
    Ok(())
}

/// Case 6: `clients` WebSocket clients at `rate` events/s: delivery p99 and messages/s.
async fn fan_out(args: &BenchArgs, report: &mut Report) -> anyhow::Result<()> {
    let clients = if args.quick { args.clients.min(50) } else { args.clients };
    let seconds = if args.quick { 0.5 } else { 5.0 };
    let rate = if args.quick { args.rate.min(200) } else { args.rate };
    let host = HostProcess::start(args, &["ws-broadcast"], None)?;
    let mut readers = Vec::new();
    for _ in 0..clients {
        let ws = connect_ws(&host.base, "").await?;
        readers.push(tokio::spawn(async move {
            let (_, mut read) = ws.split();
            let mut at = Vec::new();
            while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(5), read.next()).await {
                if let Some(id) = frame_id(&message) {
                    at.push((id, Instant::now()));
                }
            }
            at
        }));
    }
    let started = Instant::now();
    let sent = paced_publish(&host.base, rate, seconds, 1).await?;
    let mut latencies = Vec::new();
    let mut last = started;
    for reader in readers {
        for (id, at) in reader.await? {
            if let Some(t) = sent.get(&id) {
                latencies.push(at.duration_since(*t).as_secs_f64() * 1000.0);
                last = last.max(at);
            }
        }
    }
    let delivered = latencies.len();
    let lat = sorted(latencies);
    let span = last.duration_since(started).as_secs_f64().max(0.001);
    report.add(
        "fanout.p99_ms",
        &format!("fan-out {clients} clients at {rate}/s: delivery p99"),
        percentile(&lat, 0.99),
        "ms",
        format!("{delivered} of {} delivered", sent.len() * clients),
    );
    report.add(
        "fanout.messages_per_sec",
        &format!("fan-out {clients} clients: messages delivered"),
        delivered as f64 / span,
        "msg/s",
        String::new(),
    );
    Ok(())
}
