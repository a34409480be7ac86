//! Case 3: publish → ws-broadcast plugin → WebSocket client, at `--rate` events/s, on the
//! embedded log and on Iggy; with the host's resident memory idle and under that load.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use owlery_testkit::IggyServer;

use super::BenchArgs;
use super::clients::{Received, connect_ws, paced_publish, receive};
use super::host::BenchHost;
use super::report::{Report, percentile, sorted};

/// Event ids of the warm-up, apart from the measured ones (1, 2, ...).
const WARMUP_IDS: u64 = 1 << 40;

pub(super) async fn end_to_end(args: &BenchArgs, report: &mut Report, iggy_bin: Option<&Path>) -> anyhow::Result<()> {
    let seconds: f64 = if args.quick { 0.5 } else { 10.0 };
    let mut backends: Vec<(&str, Option<IggyServer>)> = vec![("embedded", None)];
    match iggy_bin {
        Some(bin) => backends.push(("iggy", Some(IggyServer::start_binary(bin, true)?))),
        None => report.note("e2e.iggy", "skipped: no iggy-server found"),
    }
    for (name, iggy) in backends {
        let host = BenchHost::start(args, &["ws-broadcast", "analytics", "alerts"], iggy.as_ref())?;
        let idle = host.rss_mb();
        // Warm up at the same rate, unmeasured: the first write to each fresh partition of an
        // Iggy topic takes 100-200 ms (measured), a one-off that would otherwise be most of
        // the p99 of a 10 s run. `OWLERY_BENCH_NO_WARMUP=1` measures from a cold start.
        if std::env::var_os("OWLERY_BENCH_NO_WARMUP").is_none() {
            paced_publish(&host.base, args.rate, seconds.min(1.0), WARMUP_IDS).await?;
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        let received = tokio::spawn(receive(connect_ws(&host.base, "").await?));
        let sent = paced_publish(&host.base, args.rate, seconds, 1).await?;
        let busy = host.rss_mb();
        let Received { frames, closed } = received.await?;
        let received: HashMap<u64, Instant> = frames.into_iter().collect();
        // OWLERY_BENCH_LATENCIES=PATH writes each event's latency in publish order to
        // PATH.embedded and PATH.iggy (`id ms` lines): where in the run the slow ones were.
        if let Ok(path) = std::env::var("OWLERY_BENCH_LATENCIES") {
            let mut ids: Vec<u64> = sent.keys().copied().collect();
            ids.sort_unstable();
            let lines: Vec<String> = ids
                .iter()
                .filter_map(|id| {
                    Some(format!("{id} {:.3}", received.get(id)?.duration_since(sent[id]).as_secs_f64() * 1e3))
                })
                .collect();
            std::fs::write(format!("{path}.{name}"), lines.join("\n"))?;
        }
        let lat = sorted(
            sent.iter()
                .filter_map(|(id, t)| received.get(id).map(|r| r.duration_since(*t).as_secs_f64() * 1000.0))
                .collect(),
        );
        report.add(
            &format!("e2e.{name}.p50_ms"),
            &format!("end to end {name} at {}/s: p50", args.rate),
            percentile(&lat, 0.5),
            "ms",
            String::new(),
        );
        report.add(
            &format!("e2e.{name}.p99_ms"),
            &format!("end to end {name} at {}/s: p99", args.rate),
            percentile(&lat, 0.99),
            "ms",
            match closed {
                // The slow-client policy cut the client off: it would reconnect with `since`.
                Some(reason) => format!("{} of {} delivered, then closed: {reason}", lat.len(), sent.len()),
                None => format!("{} of {} delivered", lat.len(), sent.len()),
            },
        );
        if name == "embedded" {
            report.add(
                "footprint.idle_rss_mb",
                "footprint: resident memory idle, 3 plugins",
                idle,
                "MB",
                String::new(),
            );
            report.add("footprint.load_rss_mb", "footprint: resident memory under load", busy, "MB", String::new());
        }
    }
    Ok(())
}
