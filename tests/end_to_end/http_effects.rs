//! HTTP effects (`send-http`): the shipped `alerts` plugin posts every alert to webhooks, and a
//! receiver started by the test, a real HTTP server on a local port, answers as each test
//! needs (down, 500, 429 with `Retry-After`, 400, slow). What it checks: every request
//! arrives at least once, repeats carry the same `Idempotency-Key`, a replay or a restart
//! sends nothing twice that was delivered, a `kill -9` loses nothing pending, a URL outside
//! the allow-list is refused, a slow receiver holds up no plugin, and two hosts on one Iggy
//! send each request once.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use crate::support::{Host, event, guests};

const WAIT: Duration = Duration::from_secs(60);

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    path: String,
    key: String,
    body: Value,
    at: Instant,
    /// What it was answered.
    status: u16,
}

/// How the receiver answers: (status, Retry-After seconds, delay before answering), from
/// the request's path and how many times its key came before.
type Answer = dyn Fn(&str, usize) -> (u16, Option<u64>, Duration) + Send + Sync;

/// A real HTTP server on a local port that records what it gets.
struct Receiver {
    address: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    /// Requests being answered right now, and the most at once.
    in_flight: Arc<Mutex<(usize, usize)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(answer: impl Fn(&str, usize) -> (u16, Option<u64>, Duration) + Send + Sync + 'static) -> Receiver {
        Receiver::on(SocketAddr::from(([127, 0, 0, 1], 0)), Arc::new(answer)).await
    }

    async fn on(address: SocketAddr, answer: Arc<Answer>) -> Receiver {
        let listener = tokio::net::TcpListener::bind(address).await.expect("the receiver binds");
        let address = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let in_flight: Arc<Mutex<(usize, usize)>> = Arc::default();
        let (recorded, flying) = (got.clone(), in_flight.clone());
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap, body: String| {
            let (recorded, flying, answer) = (recorded.clone(), flying.clone(), answer.clone());
            async move {
                {
                    let mut f = flying.lock().unwrap();
                    f.0 += 1;
                    f.1 = f.1.max(f.0);
                }
                let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                let before = recorded.lock().unwrap().iter().filter(|g| g.key == key).count();
                let (status, retry_after, delay) = answer(uri.path(), before);
                let got = Got {
                    path: uri.path().to_owned(),
                    key,
                    body: serde_json::from_str(&body).unwrap_or(Value::String(body)),
                    at: Instant::now(),
                    status,
                };
                recorded.lock().unwrap().push(got);
                tokio::time::sleep(delay).await;
                flying.lock().unwrap().0 -= 1;
                let mut response = axum::response::Response::new(axum::body::Body::empty());
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                if let Some(seconds) = retry_after {
                    response.headers_mut().insert("retry-after", seconds.to_string().parse().unwrap());
                }
                response
            }
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { address, got, in_flight, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Wait until `done` holds of what arrived.
    async fn until(&self, what: &str, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.got();
            if done(&got) {
                return got;
            }
            assert!(Instant::now() < deadline, "the receiver never got {what}: {got:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The alerts manifest: CRITICAL incidents raise alerts, posted to each webhook; requests
/// may go to `allow`; `[delivery]` is `delivery` and, unless it says, short backoffs so the
/// tests run in seconds.
fn alerts_manifest(allow: &str, webhooks: &[(String, &str)], delivery: &str) -> String {
    let mut settings = delivery.to_owned();
    for default in ["backoff_ms = 100", "max_backoff_ms = 500", "timeout_ms = 5000"] {
        let key = default.split(' ').next().unwrap();
        if !delivery.contains(key) {
            settings.push_str(&format!("\n{default}"));
        }
    }
    let mut manifest = format!(
        "[subscribe]\nevent_types = [\"incident.created\"]\n\
         [capabilities]\nbroadcast = true\npublish = [\"alert.raised\"]\nhttp = [{allow:?}]\n\
         [delivery]\n{settings}\n\
         [config]\nseverities = [\"CRITICAL\"]\n"
    );
    for (url, format) in webhooks {
        manifest.push_str(&format!("[[config.webhooks]]\nurl = {url:?}\nformat = {format:?}\n"));
    }
    manifest
}

fn alerts(manifest: String) -> (String, std::path::PathBuf, String) {
    ("alerts".to_owned(), std::path::PathBuf::from(guests::ALERTS), manifest)
}

fn critical(n: usize) -> Vec<Value> {
    (0..n).map(|i| event("incident.created", json!({"id": i, "severity": "CRITICAL"}))).collect()
}

/// The plugin's `http` status once `done` holds of it.
async fn http_status(host: &Host, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = host.plugin("alerts").await;
        if done(&status["http"]) {
            return status["http"].clone();
        }
        assert!(Instant::now() < deadline, "alerts' http status never got there: {status}\n{}", host.log_tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn keys(got: &[Got]) -> HashSet<String> {
    got.iter().map(|g| g.key.clone()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_alert_is_posted_once_as_json_and_as_slack_text_with_its_key_and_a_replay_sends_none_again() {
    let receiver = Receiver::start(|_, _| (200, None, Duration::ZERO)).await;
    let webhooks = [(receiver.url("/hooks/json"), "json"), (receiver.url("/hooks/slack"), "slack")];
    let manifest = alerts_manifest(&receiver.url("/hooks/*"), &webhooks, "");
    let host = Host::with_plugins(&[alerts(manifest.clone())]);
    let mut batch = critical(3);
    batch.push(event("incident.created", json!({"id": 9, "severity": "LOW"})));
    let (status, accepted) = host.post_events(&json!(batch)).await;
    assert_eq!(status, 201, "{accepted}");
    let got = receiver.until("six requests", |g| g.len() >= 6).await;
    host.caught_up("alerts").await;
    let http = http_status(&host, |h| h["delivered"] == 6).await;
    assert_eq!(http["pending"], 0, "{http}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got_later = receiver.got();
    assert_eq!(got_later.len(), 6, "each request once: {got_later:#?}");
    let metrics = host.http.get(host.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        r#"owlery_http_request_attempts_total{outcome="delivered",plugin="alerts"} 6"#,
        r#"owlery_http_requests_pending{plugin="alerts"} 0"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }

    let keys = keys(&got);
    assert_eq!(keys.len(), 6, "a key per request: {got:#?}");
    assert!(keys.iter().all(|k| uuid::Uuid::parse_str(k).is_ok()), "keys are the requests' ids: {keys:?}");
    let critical_ids: HashSet<&str> =
        accepted["events"].as_array().unwrap()[..3].iter().map(|e| e["eventId"].as_str().unwrap()).collect();
    let json_posts: Vec<&Got> = got.iter().filter(|g| g.path == "/hooks/json").collect();
    assert_eq!(json_posts.len(), 3);
    for post in &json_posts {
        assert_eq!(post.body["eventType"], "alert.raised", "{:?}", post.body);
        assert_eq!(post.body["severity"], "CRITICAL");
        assert!(critical_ids.contains(post.body["sourceEventId"].as_str().unwrap()), "{:?}", post.body);
    }
    let slack: Vec<&Got> = got.iter().filter(|g| g.path == "/hooks/slack").collect();
    assert_eq!(slack.len(), 3);
    for post in &slack {
        let text = post.body["text"].as_str().unwrap_or_else(|| panic!("slack form: {:?}", post.body));
        assert!(text.contains("CRITICAL incident"), "{text}");
    }

    // A replay from zero builds the same alerts again, and sends none of them again.
    let (status, body) = host.post_json("/api/plugins/alerts/replay", &json!({"from": 0})).await;
    assert_eq!(status, 202, "{body}");
    let deadline = Instant::now() + WAIT;
    while !host.plugin("alerts").await["replay"]["finishedAt"].is_string() {
        assert!(Instant::now() < deadline, "the replay never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    host.caught_up("alerts").await;
    // New alerts after the replay are sent as ever.
    assert_eq!(host.post_events(&json!(critical(1))).await.0, 201);
    receiver.until("two more requests", |g| g.len() >= 8).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.got().len(), 8, "nothing from the replay: {:#?}", receiver.got());

    // A shadow of the same plugin runs every event from zero, and sends nothing.
    let response = host
        .http
        .post(host.url("/api/plugins/alerts/shadow"))
        .query(&[("manifest", manifest.as_str())])
        .header("content-type", "application/wasm")
        .body(std::fs::read(guests::ALERTS).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let deadline = Instant::now() + WAIT;
    while host.plugin("alerts").await["shadow"]["caughtUp"] != true {
        assert!(Instant::now() < deadline, "the shadow never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.got().len(), 8, "nothing from the shadow: {:#?}", receiver.got());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_down_then_failing_then_throttling_gets_every_request_with_the_same_key() {
    // A port nothing listens on yet.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = reserved.local_addr().unwrap();
    drop(reserved);
    let url = format!("http://{address}/hooks/json");
    let manifest = alerts_manifest(&format!("http://{address}/hooks/*"), &[(url, "json")], "attempts = 30");
    let host = Host::with_plugins(&[alerts(manifest)]);
    assert_eq!(host.post_events(&json!(critical(2))).await.0, 201);
    // Down: the requests wait, counted as pending, with the error.
    let http = http_status(&host, |h| h["pending"] == 2 && h["lastError"].is_string()).await;
    let error = http["lastError"].as_str().unwrap();
    assert!(error.contains(&format!("POST http://{address}")) && !error.contains("/hooks/"), "{error}");

    // Up: the first attempt of each key gets 500, the second 408, the third 429 with
    // Retry-After: 5 (longer than any backoff here could be), then 200.
    let receiver = Receiver::on(
        address,
        Arc::new(|_: &str, before: usize| match before {
            0 => (500, None, Duration::ZERO),
            1 => (408, None, Duration::ZERO),
            2 => (429, Some(5), Duration::ZERO),
            _ => (200, None, Duration::ZERO),
        }),
    )
    .await;
    let got = receiver.until("both delivered", |g| g.iter().filter(|g| g.status == 200).count() >= 2).await;
    let mut by_key: HashMap<&str, Vec<&Got>> = HashMap::new();
    for g in &got {
        by_key.entry(g.key.as_str()).or_default().push(g);
    }
    assert_eq!(by_key.len(), 2, "two requests, each repeated under its own key: {got:#?}");
    for (key, attempts) in &by_key {
        let statuses: Vec<u16> = attempts.iter().map(|g| g.status).collect();
        assert_eq!(statuses, [500, 408, 429, 200], "{key}");
        assert!(attempts.windows(2).all(|w| w[0].body == w[1].body), "the same body each time");
        let waited = attempts[3].at - attempts[2].at;
        assert!(waited >= Duration::from_millis(4900), "Retry-After: 5 was honoured: {waited:?}");
    }
    let http = http_status(&host, |h| h["delivered"] == 2).await;
    assert_eq!((http["pending"].as_u64(), http["failed"].as_u64()), (Some(0), Some(0)), "{http}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_refused_by_its_receiver_or_failing_every_attempt_becomes_a_dead_letter() {
    let receiver = Receiver::start(|path, _| match path {
        "/hooks/gone" => (404, None, Duration::ZERO),
        _ => (503, None, Duration::ZERO),
    })
    .await;
    let webhooks = [(receiver.url("/hooks/gone"), "json"), (receiver.url("/hooks/down"), "json")];
    let manifest = alerts_manifest(&receiver.url("/hooks/*"), &webhooks, "attempts = 3");
    let host = Host::with_plugins(&[alerts(manifest)]);
    assert_eq!(host.post_events(&json!(critical(1))).await.0, 201);
    let http = http_status(&host, |h| h["failed"] == 2).await;
    assert_eq!(http["pending"], 0, "{http}");
    let got = receiver.got();
    assert_eq!(got.iter().filter(|g| g.path == "/hooks/gone").count(), 1, "a 404 is final: {got:#?}");
    assert_eq!(got.iter().filter(|g| g.path == "/hooks/down").count(), 3, "503 is tried `attempts` times");

    let deadline = Instant::now() + WAIT;
    let letters = loop {
        let letters: Vec<Value> = host
            .topic_records("dead-letters")
            .await
            .into_iter()
            .map(|r| r["event"].clone())
            .filter(|e| e["eventType"] == "owlery.delivery_failed")
            .collect();
        if letters.len() >= 2 {
            break letters;
        }
        assert!(Instant::now() < deadline, "no dead letters: {letters:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut statuses: Vec<u64> = letters.iter().map(|l| l["data"]["lastStatus"].as_u64().unwrap()).collect();
    statuses.sort();
    assert_eq!(statuses, [404, 503]);
    for letter in &letters {
        let data = &letter["data"];
        assert_eq!(data["plugin"], "alerts");
        assert_eq!(data["destination"], format!("http://{}", receiver.address));
        assert!(!letter.to_string().contains("/hooks/"), "the URL's path is left out: {letter}");
        assert!(keys(&got).contains(data["requestId"].as_str().unwrap()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_pending_at_a_kill_9_are_sent_after_the_restart_under_the_same_keys() {
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answering = up.clone();
    let receiver = Receiver::start(move |_, _| {
        let status = if answering.load(std::sync::atomic::Ordering::SeqCst) { 200 } else { 503 };
        (status, None, Duration::ZERO)
    })
    .await;
    let manifest =
        alerts_manifest(&receiver.url("/hooks/*"), &[(receiver.url("/hooks/json"), "json")], "attempts = 100");
    let mut host = Host::with_plugins(&[alerts(manifest)]);
    assert_eq!(host.post_events(&json!(critical(5))).await.0, 201);
    let before = receiver.until("an attempt at each of five requests", |g| keys(g).len() >= 5).await;
    host.kill9();
    host.start();
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    let got = receiver
        .until("each of the five delivered", |g| {
            keys(&g.iter().filter(|g| g.status == 200).cloned().collect::<Vec<_>>()).len() >= 5
        })
        .await;
    assert_eq!(keys(&got), keys(&before), "the same five keys before and after the kill");
    let http = http_status(&host, |h| h["delivered"] == 5).await;
    assert_eq!(http["pending"], 0, "{http}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delivered = receiver.got().iter().filter(|g| g.status == 200).count();
    assert_eq!(delivered, 5, "delivered once each after the restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_url_outside_the_allow_list_is_refused_and_the_alert_is_still_raised() {
    let receiver = Receiver::start(|_, _| (200, None, Duration::ZERO)).await;
    // Allowed: /hooks/* only. The webhook points at /admin on the same receiver.
    let manifest = alerts_manifest(&receiver.url("/hooks/*"), &[(receiver.url("/admin"), "json")], "");
    let host = Host::with_plugins(&[alerts(manifest)]);
    assert_eq!(host.post_events(&json!(critical(1))).await.0, 201);
    host.caught_up("alerts").await;
    let query = host.query("alerts", "").await;
    assert_eq!(query["webhookRefusals"], 1, "{query}");
    let refusal = query["lastWebhookRefusal"].as_str().unwrap();
    assert!(refusal.contains("does not allow"), "{refusal}");
    let raised = host.topic_records("alert-events").await;
    assert_eq!(raised.len(), 1, "the alert itself is raised: {raised:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.got().is_empty(), "nothing was sent: {:?}", receiver.got());
    assert_eq!(host.plugin("alerts").await["http"]["pending"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_receiver_holds_up_no_plugin_and_gets_at_most_the_limit_at_once() {
    // Each answer takes 20 s: sending 100 one after another would take half an hour.
    let receiver = Receiver::start(|_, _| (200, None, Duration::from_secs(20))).await;
    let manifest =
        alerts_manifest(&receiver.url("/hooks/*"), &[(receiver.url("/hooks/json"), "json")], "timeout_ms = 60000");
    let host = Host::with_plugins(&[alerts(manifest)]);
    assert_eq!(host.post_events(&json!(critical(100))).await.0, 201);
    host.caught_up("alerts").await;
    let status = host.plugin("alerts").await;
    assert_eq!(status["processed"], 100, "every event handled while the receiver is busy: {status}");
    // Taken in from the log a moment after the plugin committed them (the outbox, then the
    // requests topic's reader, run on their own): waited for, since under a full test run
    // that moment was seen to be longer than one status read.
    let http = http_status(&host, |h| h["pending"].as_u64().is_some_and(|p| p >= 90)).await;
    assert_eq!(http["delivered"], 0, "the requests wait for the receiver, not the plugin: {http}");
    receiver.until("the first requests", |g| g.len() >= 4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, most) = *receiver.in_flight.lock().unwrap();
    assert_eq!(most, 4, "http_per_destination (4) at once");
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(owlery_skip_iggy, ignore = "SKIPPED: OWLERY_SKIP_IGGY=1")]
async fn two_hosts_on_one_iggy_running_alerts_send_each_request_once() {
    let iggy = owlery_testkit::IggyServer::start(false);
    let receiver = Receiver::start(|_, _| (200, None, Duration::ZERO)).await;
    let manifest = alerts_manifest(&receiver.url("/hooks/*"), &[(receiver.url("/hooks/json"), "json")], "");
    let secret = ("OWLERY_CLUSTER_SECRET", "a cluster secret of at least thirty-two bytes");
    let first = Host::on_iggy_with(&iggy, &[alerts(manifest.clone())], &[secret]);
    let second = Host::on_iggy_with(&iggy, &[alerts(manifest)], &[secret]);
    assert_eq!(first.post_events(&json!(critical(10))).await.0, 201);
    receiver.until("ten requests", |g| g.len() >= 10).await;
    first.caught_up("alerts").await;
    second.caught_up("alerts").await;
    // Both hosts made all ten; give the later copies time to be read and skipped.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = receiver.got();
    assert_eq!(got.len(), 10, "each request once across both hosts: {got:#?}");
    assert_eq!(keys(&got).len(), 10);
    let delivered = |h: Value| h["delivered"].as_u64().unwrap();
    let (one, two) = (
        delivered(first.plugin("alerts").await["http"].clone()),
        delivered(second.plugin("alerts").await["http"].clone()),
    );
    assert_eq!(one + two, 10, "split between the hosts as their copies came first: {one} + {two}");
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_test_shows_the_requests_a_plugin_makes_and_sends_none() {
    let receiver = Receiver::start(|_, _| (200, None, Duration::ZERO)).await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = alerts_manifest(&receiver.url("/hooks/*"), &[(receiver.url("/hooks/json"), "json")], "");
    std::fs::write(dir.path().join("alerts.toml"), manifest).unwrap();
    let line = json!({"eventType": "incident.created", "source": "t", "data": {"id": 1, "severity": "CRITICAL"}});
    std::fs::write(dir.path().join("e.jsonl"), format!("{line}\n")).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_owlery"))
        .args(["plugin", "test", guests::ALERTS, "--manifest", "alerts.toml", "--events", "e.jsonl", "--json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    let http = report["http"].as_array().unwrap_or_else(|| panic!("{report}"));
    assert_eq!(http.len(), 1, "{report}");
    assert_eq!(http[0]["method"], "POST");
    assert_eq!(http[0]["url"], receiver.url("/hooks/json"));
    assert_eq!(http[0]["body"]["eventType"], "alert.raised");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.got().is_empty(), "plugin test sends nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_asking_for_a_forbidden_header_an_oversized_body_or_another_host_gets_an_error_and_sends_nothing() {
    let receiver = Receiver::start(|_, _| (200, None, Duration::ZERO)).await;
    let manifest = format!(
        "[subscribe]\ntopics = [\"events\"]\n[capabilities]\nhttp = [{:?}]\n[limits]\nretries = 0\n\
         output_bytes_per_batch = 4194304\n[config]\nmode = \"http\"\n",
        receiver.url("/hooks/*")
    );
    let host = Host::with_plugins(&[("hostile".to_owned(), std::path::PathBuf::from(guests::MISBEHAVE), manifest)]);
    let hook = receiver.url("/hooks/in");
    let ask = |url: &str, headers: Value, body_bytes: usize| {
        event("test.http", json!({"poison": true, "url": url, "headers": headers, "bodyBytes": body_bytes}))
    };
    let hostile = [
        (ask(&hook, json!([["Host", "internal.example"]]), 0), "host"),
        (ask(&hook, json!([["Proxy-Authorization", "Basic eA=="]]), 0), "proxy-authorization"),
        (ask(&hook, json!([["Idempotency-Key", "mine"]]), 0), "idempotency-key"),
        (ask(&hook, json!([["x-ok", "a\r\nInjected: 1"]]), 0), "x-ok"),
        (ask(&hook, json!([]), (1 << 20) + 1), "more than"),
        (ask(&receiver.url("/admin"), json!([]), 0), "does not allow"),
        (ask("http://169.254.169.254/latest/meta-data", json!([]), 0), "does not allow"),
    ];
    let mut events: Vec<Value> = hostile.iter().map(|(e, _)| e.clone()).collect();
    events.push(ask(&hook, json!([["x-ok", "1"]]), 10));
    assert_eq!(host.post_events(&json!(events)).await.0, 201);
    host.caught_up("hostile").await;

    let deadline = Instant::now() + WAIT;
    let letters = loop {
        let letters = host.topic_records("dead-letters").await;
        if letters.len() >= hostile.len() {
            break letters;
        }
        assert!(Instant::now() < deadline, "{} dead letters: {letters:#?}", letters.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(letters.len(), hostile.len(), "{letters:#?}");
    for (event, why) in &hostile {
        let letter = letters
            .iter()
            .find(|l| l["event"]["data"]["event"]["data"] == event["data"])
            .unwrap_or_else(|| panic!("no dead letter for {event}: {letters:#?}"));
        let error = letter["event"]["data"]["error"].as_str().unwrap().to_lowercase();
        assert!(error.contains(why), "the error names {why:?}: {error}");
    }
    let got = receiver.until("the one allowed request", |g| !g.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_now = receiver.got();
    assert_eq!(got_now.len(), 1, "only the allowed request went out: {got_now:#?}");
    assert_eq!(got[0].path, "/hooks/in");
    assert_eq!(host.plugin("hostile").await["http"]["delivered"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_plugin_may_subscribe_to_the_topic_that_carries_every_plugins_requests() {
    let host = Host::with_plugins(&[]);
    let wasm = std::fs::read(guests::MISBEHAVE).unwrap();
    for topic in ["owlery-http", "owlery-fanout"] {
        let manifest = format!("[subscribe]\ntopics = [\"{topic}\"]\n[config]\nmode = \"error\"\n");
        let response = host.upload("snoop", wasm.clone(), Some(&manifest)).send().await.unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 400, "{topic}: {body}");
        assert!(body["error"].as_str().unwrap_or_default().contains("the host's own"), "{topic}: {body}");
    }
    assert_eq!(host.get("/api/plugins/snoop").await.0, 404, "nothing was installed");
}
