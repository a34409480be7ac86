//! Case 2: HTTP publish latency and throughput, on the embedded log and on Iggy (from a
//! cold start, and running), and Iggy's own HTTP API under the same load as the baseline.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use owlery_testkit::IggyServer;
use serde_json::{Value, json};

use super::BenchArgs;
use super::clients::{Sender, bench_event, load, owlery_sender};
use super::host::BenchHost;
use super::report::{Report, percentile, ratio};

pub(super) async fn publish(args: &BenchArgs, report: &mut Report, iggy_bin: Option<&Path>) -> anyhow::Result<()> {
    let (requests, clients) = if args.quick { (400, 4) } else { (20_000, 16) };
    let host = BenchHost::start(args, &[], None)?;
    let (lat, rate) = load(requests, clients, owlery_sender(host.base.clone())).await?;
    report.latencies("publish.embedded", "publish embedded", &lat, |_, _| String::new());
    report.add("publish.embedded.events_per_sec", "publish embedded: throughput", rate, "events/s", String::new());
    drop(host);

    let Some(bin) = iggy_bin else {
        report
            .note("publish.iggy", "skipped: no iggy-server found (IGGY_SERVER_BIN, ../shared/iggy/iggy-server, PATH)");
        return Ok(());
    };
    let iggy = IggyServer::start_binary(bin, true)?;
    let host = BenchHost::start(args, &[], Some(&iggy))?;
    // From a cold start: the host logs in to Iggy and makes its topic while the load runs,
    // then forwards what it spooled meanwhile beside the new publishes.
    let (cold, _) = load(requests, clients, owlery_sender(host.base.clone())).await?;
    // Then as it runs: connected, its topic made, nothing of the first load left to forward
    // (the state Iggy's own HTTP API is measured in below, too).
    let http = reqwest::Client::new();
    wait_until_forwarding(&http, &host).await?;
    let (lat, owlery_rate) = load(requests, clients, owlery_sender(host.base.clone())).await?;

    // Iggy's own HTTP API, same load, same payload, to the same stream (its `events`
    // topic: the host sends these to `incident-events`).
    wait_until_forwarding(&http, &host).await?;
    let sender = iggy_http_sender(&http, iggy.http_port).await?;
    wait_for_iggy_http(&http, &sender).await?;
    let (iggy_lat, iggy_rate) = load(requests, clients, sender).await?;
    report.latencies("publish.iggy", "publish iggy", &lat, |fraction, point| {
        if fraction < 0.999 {
            format!("Iggy HTTP {point} {:.2} ms", percentile(&iggy_lat, fraction))
        } else {
            String::new()
        }
    });
    report.add(
        "publish.iggy_cold.p99_ms",
        "publish iggy from a cold start: latency p99",
        percentile(&cold, 0.99),
        "ms",
        format!("p99.9 {:.2} ms", percentile(&cold, 0.999)),
    );
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

/// Wait until the host is connected to Iggy, has created its topics there (`events` among
/// them: every routed topic is made before the host counts as connected), and has
/// forwarded everything it accepted.
async fn wait_until_forwarding(http: &reqwest::Client, host: &BenchHost) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status: Value = http.get(format!("{}/api/monitoring/iggy-status", host.base)).send().await?.json().await?;
        if status["connected"] == true && status["topics"]["events"].is_object() && status["spool"]["pending"] == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the host never created its topics in Iggy or never forwarded what it accepted: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until Iggy's HTTP API takes a message too. A new topic's partitions reach Iggy's
/// shards one by one: its HTTP API can answer `partition_not_found` for a while after the
/// host (on another connection) has created and written to them, mostly on a busy machine.
async fn wait_for_iggy_http(http: &reqwest::Client, send: &Sender) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match send(http.clone(), 0).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e.context("Iggy's HTTP API never took a message")),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Publishing straight to Iggy's HTTP API on `port`: the same event to the host's stream,
/// its `events` topic, partition 0, as the root user.
async fn iggy_http_sender(http: &reqwest::Client, port: u16) -> anyhow::Result<Sender> {
    let login: Value = http
        .post(format!("http://127.0.0.1:{port}/users/login"))
        .json(&json!({"username": "iggy", "password": "iggy"}))
        .send()
        .await?
        .json()
        .await?;
    let token = login["access_token"]["token"].as_str().context("Iggy login")?.to_owned();
    let url = format!("http://127.0.0.1:{port}/streams/owlery/topics/events/messages");
    Ok(Arc::new(move |http, i| {
        let (url, token) = (url.clone(), token.clone());
        Box::pin(async move {
            let encode = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
            let payload = encode(&serde_json::to_vec(&bench_event(i))?);
            let body = json!({"partitioning": {"kind": "partition_id", "value": encode(&0u32.to_le_bytes())}, "messages": [{"id": 0, "payload": payload}]});
            let response = http.post(url).bearer_auth(token).json(&body).send().await?;
            let status = response.status();
            if !status.is_success() {
                bail!("Iggy HTTP answered {status}: {}", response.text().await.unwrap_or_default());
            }
            Ok(())
        })
    }))
}
