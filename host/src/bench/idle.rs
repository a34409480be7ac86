//! Case 7: `--idle` WebSocket clients (10,000) connected and doing nothing: the host's
//! resident memory per connection.

use std::time::Duration;

use super::BenchArgs;
use super::clients::connect_ws;
use super::host::BenchHost;
use super::report::Report;

pub(super) async fn idle(args: &BenchArgs, report: &mut Report) -> anyhow::Result<()> {
    let clients = if args.quick { args.idle.min(200) } else { args.idle };
    let config = format!("max_clients = {}\n", clients + 10);
    let host = BenchHost::start_with(args, &["ws-broadcast"], None, Some(&config))?;
    // Settled: the runner started, the first allocations made.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = host.rss_mb();
    let mut connections = Vec::with_capacity(clients);
    for _ in 0..clients {
        connections.push(connect_ws(&host.base, "").await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = host.rss_mb();
    let per_connection_kb = (after - before).max(0.0) * 1024.0 / clients as f64;
    report.add(
        "idle.rss_per_connection_kb",
        &format!("{clients} idle WebSocket clients: memory per connection"),
        per_connection_kb,
        "KB",
        format!("resident {before:.1} MB idle, {after:.1} MB with them"),
    );
    drop(connections);
    Ok(())
}
