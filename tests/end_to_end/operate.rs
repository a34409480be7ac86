//! Operating a host: `/metrics` read by Prometheus's own parser (the Python client's) with
//! values that move as events flow, `/ready` that says why not, `iggy-status` in the seed's
//! shape and 503 while Iggy is down, the `plugins` CLI against a host with auth, and JSON
//! log lines with summaries that do not flood.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Host, event, guests, shipped};

const WAIT: Duration = Duration::from_secs(30);

/// Parse the text format with `prometheus_client.parser` (what Prometheus's own Python client
/// uses): every sample as `name{label="value",...}` → value, labels sorted.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the Prometheus parser refused the text (./test.sh installs prometheus-client):\n{}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

async fn scrape(host: &Host) -> HashMap<String, f64> {
    let response = host.http.get(host.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let kind = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    parse_metrics(&response.text().await.unwrap())
}

fn value(metrics: &HashMap<String, f64>, sample: &str) -> f64 {
    *metrics.get(sample).unwrap_or_else(|| panic!("no {sample} in {:?}", metrics.keys().collect::<Vec<_>>()))
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(owlery_skip_python, ignore = "SKIPPED: OWLERY_SKIP_PYTHON=1")]
async fn metrics_parse_as_prometheus_text_and_move_as_events_flow() {
    let host = Host::with_shipped_plugins();
    let mut client = host.ws("").await;
    let before = scrape(&host).await;
    assert_eq!(value(&before, r#"owlery_clients_connected{}"#), 1.0);
    let batch: Vec<Value> = (0..10).map(|n| event("incident.created", json!({"id": n, "severity": "LOW"}))).collect();
    assert_eq!(host.post_events(&json!(batch)).await.0, 201);
    for plugin in ["ws-broadcast", "analytics", "alerts"] {
        host.caught_up(plugin).await;
    }
    for _ in 0..10 {
        client.next_event(WAIT).await.expect("the broadcasts arrive");
    }
    let after = scrape(&host).await;
    let moved = |sample: &str| value(&after, sample) - before.get(sample).copied().unwrap_or(0.0);
    for plugin in ["ws-broadcast", "analytics", "alerts"] {
        let labels = format!(r#"{{plugin="{plugin}"}}"#);
        assert_eq!(moved(&format!("owlery_plugin_events_processed_total{labels}")), 10.0, "{plugin}");
        assert!(moved(&format!("owlery_plugin_batch_duration_seconds_count{labels}")) >= 1.0, "{plugin}");
        assert_eq!(value(&after, &format!("owlery_plugin_lag{labels}")), 0.0);
        assert_eq!(value(&after, &format!("owlery_plugin_dead_letters_total{labels}")), 0.0);
        assert_eq!(value(&after, &format!(r#"owlery_plugin_state{{plugin="{plugin}",state="running"}}"#)), 1.0);
    }
    assert!(value(&after, r#"owlery_plugin_state_bytes{plugin="analytics"}"#) > 0.0, "analytics keeps state");
    assert_eq!(moved(r#"owlery_publish_requests_total{status="201"}"#), 1.0);
    assert_eq!(moved(r#"owlery_publish_duration_seconds_count{status="201"}"#), 1.0);
    assert!(moved(r#"owlery_frames_sent_total{transport="websocket"}"#) >= 10.0);
    assert!(value(&after, r#"owlery_fanout_log_records{}"#) >= 10.0);
    assert!(!after.keys().any(|k| k.starts_with("owlery_iggy_")), "no Iggy figures on the embedded log");
    // A refused publish is counted under its status.
    assert_eq!(host.post_raw("{\"eventType\": 5}").await.0, 400);
    assert_eq!(value(&scrape(&host).await, r#"owlery_publish_requests_total{status="400"}"#), 1.0);
}

/// A misbehave plugin that traps on every event, so 100 events in a row mark it failed.
fn trapper() -> (String, PathBuf, String) {
    let manifest = "[subscribe]\ntopics = [\"events\"]\n\n[limits]\nretries = 0\n\n[config]\nmode = \"trap\"\n";
    ("trapper".to_owned(), PathBuf::from(guests::MISBEHAVE), manifest.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_says_why_not_when_a_plugin_has_failed_and_health_stays_cheap() {
    let host = Host::with_plugins(&[trapper(), shipped("analytics")]);
    let (status, ready) = host.get("/ready").await;
    assert_eq!((status, &ready["ready"]), (200, &json!(true)), "{ready}");
    let (_, monitoring) = host.get("/api/monitoring/iggy-status").await;
    assert_eq!(monitoring["status"], "healthy", "{monitoring}");

    let poisoned: Vec<Value> = (0..100).map(|n| event("test.tick", json!({"n": n, "poison": true}))).collect();
    assert_eq!(host.post_json("/api/events?topic=events", &json!(poisoned)).await.0, 201);
    let deadline = Instant::now() + WAIT;
    let (status, ready) = loop {
        let (status, ready) = host.get("/ready").await;
        if status != 200 || Instant::now() > deadline {
            break (status, ready);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 503, "{ready}");
    let reasons = ready["reasons"].as_array().unwrap();
    assert!(reasons.iter().any(|r| r.as_str().unwrap().starts_with("plugin trapper has failed")), "{ready}");
    // Answered to anyone: the plugin's error (which can quote an event) stays behind admin.
    let error = host.plugin("trapper").await["lastError"].as_str().unwrap().to_owned();
    assert!(!error.is_empty() && !ready.to_string().contains(&error), "{ready} / {error}");
    assert_eq!(host.get("/health").await.0, 200, "liveness is not readiness");
    let (_, monitoring) = host.get("/api/monitoring/iggy-status").await;
    assert_eq!(monitoring["status"], "degraded", "{monitoring}");
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(owlery_skip_iggy, ignore = "SKIPPED: OWLERY_SKIP_IGGY=1")]
async fn iggy_status_has_the_seeds_shape_and_both_say_503_while_iggy_is_down() {
    let mut iggy = owlery_testkit::IggyServer::start(false);
    let host = Host::on_iggy(&iggy, &[shipped("analytics")]);
    let batch: Vec<Value> = (0..8).map(|n| event("incident.created", json!({"id": n}))).collect();
    assert_eq!(host.post_events(&json!(batch)).await.0, 201);
    // Connected, the spool forwarded, and the plugin has handled all eight.
    let deadline = Instant::now() + WAIT;
    while host.plugin("analytics").await["processed"] != 8 {
        assert!(Instant::now() < deadline, "analytics never handled the events: {}", host.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, monitoring) = host.get("/api/monitoring/iggy-status").await;
    assert_eq!((status, monitoring["status"].as_str()), (200, Some("healthy")), "{monitoring}");
    let consumers = monitoring["consumers"].as_array().unwrap();
    let handled: i64 = consumers
        .iter()
        .filter(|c| c["id"] == "owlery-analytics" && c["topic"] == "incident-events")
        .map(|c| c["currentOffset"].as_i64().unwrap() + 1)
        .sum();
    assert_eq!(handled, 8, "currentOffset is the last offset handled, per partition: {monitoring}");
    assert_eq!(host.get("/ready").await.0, 200);
    let metrics = host.http.get(host.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("\nowlery_iggy_connected 1\n"), "{metrics}");
    assert!(metrics.contains("\nowlery_iggy_spool_depth 0\n"), "{metrics}");
    assert!(metrics.contains("owlery_iggy_forward_duration_seconds_count"), "{metrics}");

    iggy.kill9();
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, monitoring) = host.get("/api/monitoring/iggy-status").await;
        if status == 503 {
            assert_eq!(monitoring["status"], "unhealthy", "{monitoring}");
            break;
        }
        assert!(Instant::now() < deadline, "iggy-status never said 503: {monitoring}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, ready) = host.get("/ready").await;
    assert_eq!(status, 503, "{ready}");
    assert!(ready["reasons"][0].as_str().unwrap().contains("the log (iggy) is unreachable"), "{ready}");
}

fn cli(host: &Host, args: &[&str], token: Option<&str>) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_owlery"));
    command.args(["plugins", "--url", &host.base]).args(args).env_remove("OWLERY_TOKEN");
    if let Some(token) = token {
        command.env("OWLERY_TOKEN", token);
    }
    command.output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_plugins_cli_sends_a_token_prints_status_for_people_and_json_for_scripts() {
    let config = "[auth]\nenabled = true\n\n[[auth.tokens]]\ntoken = \"admin-token\"\nscopes = [\"admin\"]\n\n\
                  [[auth.tokens]]\ntoken = \"publisher\"\nscopes = [\"publish\"]\n";
    let host = Host::with_config(&[shipped("analytics")], config);
    let text = |o: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };

    let refused = cli(&host, &["list"], None);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("401") && text(&refused).contains("--token or OWLERY_TOKEN"), "{}", text(&refused));
    let forbidden = cli(&host, &["list"], Some("publisher"));
    assert!(!forbidden.status.success());
    assert!(text(&forbidden).contains("403"), "the host's own words: {}", text(&forbidden));

    let listed = cli(&host, &["list"], Some("admin-token"));
    assert!(listed.status.success(), "{}", text(&listed));
    assert!(text(&listed).lines().any(|l| l.starts_with("analytics") && l.contains("running")), "{}", text(&listed));
    let status = cli(&host, &["status", "analytics"], Some("admin-token"));
    assert!(status.status.success(), "{}", text(&status));
    let shown = text(&status);
    assert!(shown.starts_with("analytics  running  version "), "{shown}");
    assert!(shown.contains("processed 0") && shown.contains("dead letters 0"), "{shown}");

    // --token too, and --json prints the host's answer as it is.
    let as_json = Command::new(env!("CARGO_BIN_EXE_owlery"))
        .args(["plugins", "--url", &host.base, "--token", "admin-token", "--json", "status", "analytics"])
        .env_remove("OWLERY_TOKEN")
        .output()
        .unwrap();
    assert!(as_json.status.success(), "{}", text(&as_json));
    let parsed: Value = serde_json::from_slice(&as_json.stdout).unwrap();
    assert_eq!(parsed["name"], "analytics");
    assert_eq!(parsed["state"], "running");

    let missing = cli(&host, &["status", "nobody"], Some("admin-token"));
    assert!(!missing.status.success());
    assert!(text(&missing).contains("404") && text(&missing).contains("nobody"), "{}", text(&missing));

    // A name that is not one never reaches the URL (it would send the token elsewhere).
    let sneaky = cli(&host, &["pause", "a/../../metrics"], Some("admin-token"));
    assert!(!sneaky.status.success());
    assert!(text(&sneaky).contains("is not a plugin name"), "{}", text(&sneaky));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_a_line_with_at_most_one_batch_summary_a_second() {
    let host = Host::with_config_and_env(&[shipped("analytics")], "", &[("OWLERY_LOG_FORMAT", "json")]);
    let started = Instant::now();
    for n in 0..40 {
        assert_eq!(host.post_events(&event("incident.created", json!({"id": n}))).await.0, 201);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    host.caught_up("analytics").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(host.post_events(&event("incident.created", json!({"id": 99}))).await.0, 201);
    host.caught_up("analytics").await;
    let seconds = started.elapsed().as_secs_f64();
    let log = host.log();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().all(|l| l["timestamp"].is_string() && l["level"].is_string()), "{log}");
    let summaries: Vec<&Value> =
        lines.iter().filter(|l| l["message"] == "batches handled" && l["plugin"] == "analytics").collect();
    assert!(!summaries.is_empty(), "batches are summed up: {log}");
    assert!(summaries.len() as f64 <= seconds + 1.0, "{} summaries in {seconds:.1} s: {log}", summaries.len());
    let publishes = lines.iter().filter(|l| l["message"] == "publish requests").count();
    assert!(publishes >= 1 && publishes as f64 <= seconds + 1.0, "{publishes} publish summaries in {seconds:.1} s");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_names_every_route_the_host_serves() {
    let host = Host::with_plugins(&[shipped("analytics")]);
    let (status, document) = host.get("/api/openapi.json").await;
    assert_eq!(status, 200);
    assert!(document["openapi"].as_str().unwrap().starts_with("3."), "{document}");
    let mut operations: Vec<(String, String)> = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            operations.push((method.to_uppercase(), path.clone()));
        }
    }
    operations.sort();
    // Every route this host has; one added without its #[utoipa::path] cannot be served
    // (the router is made from the same registrations), one dropped shows here.
    let expected = [
        ("DELETE", "/api/plugins/{name}"),
        ("DELETE", "/api/plugins/{name}/shadow"),
        ("GET", "/"),
        ("GET", "/admin"),
        ("GET", "/api/admin/charts/{file}"),
        ("GET", "/api/events/replay"),
        ("GET", "/api/monitoring/iggy-status"),
        ("GET", "/api/openapi.json"),
        ("GET", "/api/plugins"),
        ("GET", "/api/plugins/{name}"),
        ("GET", "/api/plugins/{name}/query"),
        ("GET", "/demo"),
        ("GET", "/health"),
        ("GET", "/metrics"),
        ("GET", "/ready"),
        ("GET", "/ws"),
        ("POST", "/api/events"),
        ("POST", "/api/plugins/{name}/pause"),
        ("POST", "/api/plugins/{name}/promote"),
        ("POST", "/api/plugins/{name}/replay"),
        ("POST", "/api/plugins/{name}/resume"),
        ("POST", "/api/plugins/{name}/shadow"),
        ("PUT", "/api/plugins/{name}"),
    ];
    let expected: Vec<(String, String)> = expected.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(operations, expected);

    // And each is served: no route-level 404 (an empty body) or 405 for any of them. A
    // plugin that does not exist keeps the probes harmless; handlers answer JSON.
    let served = async |method: &str, path: &str| {
        let url = host.url(&path.replace("{name}", "nobody").replace("{file}", "nobody.svg"));
        let response = host.http.request(method.parse().unwrap(), url).send().await.unwrap();
        let status = response.status().as_u16();
        let body = response.bytes().await.unwrap();
        (status, body.len())
    };
    for (method, path) in &operations {
        let (status, body) = served(method, path).await;
        assert!(status != 405 && !(status == 404 && body == 0), "{method} {path} is not served: {status}");
    }
    assert_eq!(served("GET", "/api/nothing-here").await, (404, 0), "the probe tells an unserved route");
}
