//! The live feed page, in headless Chromium, shows a published incident; and a WebSocket
//! client whose offset is from another log is told so.

use std::time::Duration;

use serde_json::json;

use crate::support::{Host, event, shipped};

/// The Chromium to drive; panics, saying how to get one, when there is none.
fn chromium() -> &'static str {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("no Chromium found: ./test.sh installs it (apt-get install chromium), or set OWLERY_SKIP_BROWSER=1")
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(owlery_skip_browser, ignore = "SKIPPED: OWLERY_SKIP_BROWSER=1")]
async fn the_live_feed_page_shows_a_published_incident() {
    let chromium = chromium();
    let host = Host::with_plugins(&[shipped("ws-broadcast")]);
    let (status, body) = host
        .post_events(&event(
            "incident.created",
            json!({"id": 4711, "severity": "CRITICAL", "title": "Gas leak in hall B"}),
        ))
        .await;
    assert_eq!(status, 201);
    let event_id = body["events"][0]["eventId"].as_str().unwrap().to_owned();
    host.caught_up("ws-broadcast").await;

    let profile = tempfile::tempdir().unwrap();
    let screenshot = host.dir.path().join("feed.png");
    let run = |args: Vec<String>| {
        let mut command = std::process::Command::new(chromium);
        command.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--window-size=1024,768",
        ]);
        command.arg(format!("--user-data-dir={}", profile.path().display()));
        command.args(args).arg(host.url("/"));
        command.output().unwrap()
    };
    let dom = run(vec!["--dump-dom".into()]);
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(dom.contains("Gas leak in hall B"), "the page shows the incident:\n{dom}");
    assert!(dom.contains(&format!("data-event-id=\"{event_id}\"")), "{dom}");
    assert!(dom.contains("incident.created #4711"), "{dom}");
    let shot = run(vec![format!("--screenshot={}", screenshot.display())]);
    assert!(shot.status.success() && screenshot.exists(), "a screenshot for people to look at");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offset_from_a_reset_log_is_reported_not_silently_skipped() {
    let host = Host::with_plugins(&[shipped("ws-broadcast")]);
    // Three incidents, so (keyed by incident) up to three partitions, handled in any order:
    // each is broadcast before the next is published, so the fan-out order is known.
    for id in 0..3 {
        host.post_events(&event("incident.created", json!({"id": id}))).await;
        host.caught_up("ws-broadcast").await;
    }
    let mut client = host.ws("?since=1&epoch=12345").await;
    let notice = client.next_json(Duration::from_secs(10)).await.unwrap();
    assert_eq!(notice["type"], "reset", "{notice}");
    let ids: Vec<_> = [(); 3].iter().map(|_| ()).collect();
    let mut got = Vec::new();
    for _ in ids {
        got.push(client.next_event(Duration::from_secs(10)).await.unwrap()["event"]["data"]["id"].clone());
    }
    assert_eq!(got, [json!(0), json!(1), json!(2)], "everything retained is sent again");

    let mut ahead = host.ws("?since=999").await;
    assert_eq!(ahead.next_json(Duration::from_secs(10)).await.unwrap()["type"], "reset");
    // The largest offset a client can name is past the end too (no overflow after it).
    let mut farthest = host.ws(&format!("?since={}", i64::MAX)).await;
    assert_eq!(farthest.next_json(Duration::from_secs(10)).await.unwrap()["type"], "reset");
    let mut everything = host.ws("?since=-1").await;
    assert_eq!(everything.next_event(Duration::from_secs(10)).await.unwrap()["offset"], 0);
}

/// The admin dashboard in headless Chromium, driven by Playwright (tests/node/admin.mjs):
/// signs in with an admin token (kept in session storage, never in the URL), shows the
/// three plugins, draws a throughput chart with data as events flow, and pauses a plugin
/// from its button (confirmed). A screenshot is kept for people to look at.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(owlery_skip_browser, ignore = "SKIPPED: OWLERY_SKIP_BROWSER=1")]
#[cfg_attr(owlery_skip_node, ignore = "SKIPPED: OWLERY_SKIP_NODE=1")]
async fn the_admin_dashboard_shows_plugins_charts_them_and_pauses_one() {
    chromium();
    let node_dir = crate::socketio::node_packages();
    assert!(
        node_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed in {}: run ./test.sh (npm ci there)",
        node_dir.display()
    );
    let config = "[auth]\nenabled = true\n\n[[auth.tokens]]\ntoken = \"ops-secret\"\nscopes = [\"admin\"]\n\n\
                  [[auth.tokens]]\ntoken = \"producer\"\nscopes = [\"publish\"]\n";
    let host = Host::with_config(&[shipped("ws-broadcast"), shipped("analytics"), shipped("alerts")], config);
    // The page holds no data; what it shows needs the admin scope.
    let page = host.http.get(host.url("/admin")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["x-frame-options"], "DENY", "never framed by another site");
    assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("frame-ancestors 'none'"));
    assert!(page.text().await.unwrap().contains("Owlery admin"));
    let chart = host.http.get(host.url("/api/admin/charts/analytics.svg")).send().await.unwrap();
    assert_eq!(chart.status(), 401, "charts need a token");

    // Events flow while the page is open.
    let publishing = {
        let (http, url) = (host.http.clone(), host.url("/api/events"));
        tokio::spawn(async move {
            for n in 0..600u64 {
                let body =
                    json!([event("incident.created", json!({"id": n})), event("incident.updated", json!({"id": n}))]);
                let _ = http.post(&url).bearer_auth("producer").json(&body).send().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Kept after the run (target/tmp/admin-dashboard.png), for people to look at.
    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin-dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/node/admin.mjs");
    let output = tokio::process::Command::new("node")
        .arg(&script)
        .args([host.base.as_str(), "ops-secret", "alerts", screenshot.to_str().unwrap()])
        .current_dir(node_dir)
        .output()
        .await
        .unwrap();
    publishing.abort();
    let (out, err) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the dashboard run failed:\n{out}\n{err}\n{}", host.log_tail());
    let report: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let mut plugins: Vec<&str> = report["plugins"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    plugins.sort();
    assert_eq!(plugins, ["alerts", "analytics", "ws-broadcast"]);
    assert!(report["peakRate"].as_f64().unwrap() > 0.0, "{report}");
    // Paused for real, as the host says.
    let status = host
        .http
        .get(host.url("/api/plugins/alerts"))
        .bearer_auth("ops-secret")
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(status["state"], "paused", "{status}");
    let shot = std::fs::read(&screenshot).expect("a screenshot for people to look at");
    assert!(shot.starts_with(b"\x89PNG") && shot.len() > 10_000, "a real picture: {} bytes", shot.len());
}
