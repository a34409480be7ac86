//! Case 5: the longest pause in processing while analytics is replaced under load, and how
//! long an upload takes to be swapped in (compiling happens off the hot path).

use std::time::{Duration, Instant};

use anyhow::bail;

use super::BenchArgs;
use super::clients::paced_publish;
use super::host::BenchHost;
use super::report::Report;

pub(super) async fn hot_swap(args: &BenchArgs, report: &mut Report) -> anyhow::Result<()> {
    let host = BenchHost::start(args, &["analytics"], None)?;
    let http = reqwest::Client::new();
    let wasm = super::read_wasm(args, "analytics")?;
    let base = host.base.clone();
    let seconds = if args.quick { 1.0 } else { 5.0 };
    let load = tokio::spawn(async move { paced_publish(&base, 2000, seconds, 1).await });
    let mut longest = 0u64;
    let mut compile = 0.0f64;
    for n in 0..if args.quick { 2 } else { 5 } {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let started = Instant::now();
        let response = http
            .put(format!("{}/api/plugins/analytics", host.base))
            .header("content-type", "application/wasm")
            .body(version(&wasm, n))
            .send()
            .await?;
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

/// Version `n` of a component: the same one with a custom section appended, so that the
/// host sees new bytes and swaps.
fn version(wasm: &[u8], n: u32) -> Vec<u8> {
    let mut version = wasm.to_vec();
    let name = b"owlery-bench";
    let body_len = 1 + name.len() + 4;
    version.extend_from_slice(&[0, body_len as u8, name.len() as u8]);
    version.extend_from_slice(name);
    version.extend_from_slice(&n.to_le_bytes());
    version
}
