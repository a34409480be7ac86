//! Case 6: `--clients` WebSocket clients (1,000) receiving every broadcast: delivery p99 and
//! messages/s at a rising publish rate, and the capacity: the highest rate whose delivery
//! p99 stayed under 50 ms with every message delivered. A fresh host per rate, so that one
//! rate's backlog does not count against the next.

use std::time::Instant;

use super::BenchArgs;
use super::clients::{connect_ws, paced_publish, receive};
use super::host::BenchHost;
use super::report::{Report, percentile, sorted};

/// The capacity's bound on delivery p99.
const CAPACITY_P99_MS: f64 = 50.0;

pub(super) async fn fan_out(args: &BenchArgs, report: &mut Report) -> anyhow::Result<()> {
    let clients = if args.quick { args.clients.min(50) } else { args.clients };
    let seconds = if args.quick { 0.5 } else { 5.0 };
    let rates: Vec<u32> = if args.quick {
        vec![args.rate.min(200)]
    } else {
        let mut rates: Vec<u32> = [100, 200, 400, 700, 1000].into_iter().filter(|r| *r < args.rate).collect();
        rates.push(args.rate);
        rates
    };
    let mut capacity = None;
    for rate in rates {
        let (p99, delivered, expected, per_second) = one_rate(args, clients, rate, seconds).await?;
        report.add(
            &format!("fanout.r{rate}.p99_ms"),
            &format!("fan-out {clients} clients at {rate}/s: delivery p99"),
            p99,
            "ms",
            format!("{delivered} of {expected} delivered, {per_second:.0} msg/s"),
        );
        if delivered == expected && p99 < CAPACITY_P99_MS {
            capacity = Some(rate);
        } else {
            break;
        }
    }
    match capacity {
        Some(rate) => report.add(
            "fanout.capacity_events_per_sec",
            &format!("fan-out {clients} clients: capacity (p99 < {CAPACITY_P99_MS:.0} ms, all delivered)"),
            f64::from(rate),
            "events/s",
            format!("{} msg/s", u64::from(rate) * clients as u64),
        ),
        None => report.note("fanout.capacity_events_per_sec", "not reached at the lowest rate tried"),
    }
    Ok(())
}

/// One host, `clients` clients, `rate` events/s for `seconds`: (delivery p99 in ms,
/// messages delivered, messages expected, messages/s).
async fn one_rate(
    args: &BenchArgs,
    clients: usize,
    rate: u32,
    seconds: f64,
) -> anyhow::Result<(f64, usize, usize, f64)> {
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
    Ok((percentile(&lat, 0.99), delivered, sent.len() * clients, delivered as f64 / span))
}
