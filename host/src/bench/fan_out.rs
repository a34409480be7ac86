//! Case 6: `--clients` WebSocket clients at `--rate` events/s: delivery p99 and messages/s.

use std::time::Instant;

use super::BenchArgs;
use super::clients::{connect_ws, paced_publish, receive};
use super::host::BenchHost;
use super::report::{Report, percentile, sorted};

pub(super) async fn fan_out(args: &BenchArgs, report: &mut Report) -> anyhow::Result<()> {
    let clients = if args.quick { args.clients.min(50) } else { args.clients };
    let seconds = if args.quick { 0.5 } else { 5.0 };
    let rate = if args.quick { args.rate.min(200) } else { args.rate };
    let host = BenchHost::start(args, &["ws-broadcast"], None)?;
    let mut readers = Vec::new();
    for _ in 0..clients {
        readers.push(tokio::spawn(receive(connect_ws(&host.base, "").await?)));
    }
    let started = Instant::now();
    let sent = paced_publish(&host.base, rate, seconds, 1).await?;
    let mut latencies = Vec::new();
    let mut last = started;
    for reader in readers {
        for (id, at) in reader.await?.frames {
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
