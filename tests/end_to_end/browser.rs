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
    for id in 0..3 {
        host.post_events(&event("incident.created", json!({"id": id}))).await;
    }
    host.caught_up("ws-broadcast").await;
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
