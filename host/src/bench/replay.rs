//! Case 4: replaying a log through analytics from offset 0; 100 events to a resuming client.

use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::BenchArgs;
use super::clients::{bench_event, connect_ws, frame_id};
use super::host::BenchHost;
use super::report::Report;

pub(super) async fn replay(args: &BenchArgs, report: &mut Report) -> anyhow::Result<()> {
    let events: u64 = if args.quick { 10_000 } else { 1_000_000 };
    let host = BenchHost::start(args, &["ws-broadcast"], None)?;
    let http = reqwest::Client::new();
    prefill(&http, &host, events).await?;
    // ws-broadcast broadcasts each of them (it takes user.connected): analytics is
    // measured alone, not beside it catching up.
    host.wait_caught_up(&http, "ws-broadcast", 0).await?;
    let wasm = super::read_wasm(args, "analytics")?;
    let manifest = std::fs::read_to_string(args.manifest_dir.join("analytics.toml")).unwrap_or_default();
    let started = Instant::now();
    let response = http
        .put(format!("{}/api/plugins/analytics", host.base))
        .query(&[("manifest", manifest)])
        .header("content-type", "application/wasm")
        .body(wasm)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("uploading analytics: {}", response.text().await?);
    }
    host.wait_caught_up(&http, "analytics", events).await?;
    let secs = started.elapsed().as_secs_f64();
    let (used, dropped) = reads_ahead(&http, &host, "analytics").await?;
    report.add(
        "replay.analytics_seconds",
        &format!("replay {events} events through analytics"),
        secs,
        "s",
        format!("{:.0} events/s; {used} of {} reads ahead used", events as f64 / secs, used + dropped),
    );

    // 100 broadcasts missed by a client, then it resumes.
    let batch: Vec<Value> = (0..101).map(bench_event).collect();
    http.post(format!("{}/api/events", host.base)).json(&batch).send().await?;
    host.wait_caught_up(&http, "ws-broadcast", 101).await?;
    let started = Instant::now();
    resume_100(&host).await?;
    report.add(
        "replay.resume_100_ms",
        "resume: 100 missed events to a WebSocket client",
        started.elapsed().as_secs_f64() * 1000.0,
        "ms",
        String::new(),
    );
    Ok(())
}

/// How many of `plugin`'s reads ahead were used, and how many dropped, from the host's
/// metrics (0 and 0 if it has none): a replay took about half again as long before its
/// batches were read ahead. Each full batch starts one (one that finds nothing is dropped).
async fn reads_ahead(http: &reqwest::Client, host: &BenchHost, plugin: &str) -> anyhow::Result<(u64, u64)> {
    let text = http.get(format!("{}/metrics", host.base)).send().await?.text().await?;
    let count = |outcome: &str| -> u64 {
        owlery_testkit::metrics::sum(
            &text,
            "owlery_plugin_reads_ahead_total",
            &[("plugin", plugin), ("outcome", outcome)],
        ) as u64
    };
    Ok((count("used"), count("dropped")))
}

/// Fill the log with `events` events, 5,000 per request.
async fn prefill(http: &reqwest::Client, host: &BenchHost, events: u64) -> anyhow::Result<()> {
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
    Ok(())
}

/// A client resuming from offset 0, until it has 100 broadcasts.
async fn resume_100(host: &BenchHost) -> anyhow::Result<()> {
    let mut ws = connect_ws(&host.base, "?since=0").await?;
    let mut got = 0;
    while got < 100 {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(message))) if frame_id(&message).is_some() => got += 1,
            Ok(Some(Ok(_))) => {}
            _ => bail!("the resuming client got {got} of 100"),
        }
    }
    Ok(())
}
