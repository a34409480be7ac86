//! `owlery bench`: measures Owlery in one run on this machine and prints a table (and, with
//! `--json FILE`, the same figures as JSON, one key each). Where there is a natural
//! comparison (native code, Iggy's own HTTP API) it is printed as a ratio beside it.
//!
//! Plugin dispatch runs in this process; everything else runs against real `owlery serve`
//! processes (and a real Iggy server when one is found) over HTTP and WebSocket, started
//! through `owlery_testkit`, the harness the end-to-end tests use too.
//!
//! Tooling, not product: compiled only with the `bench` feature (on by default), and no
//! product module imports it. One file per case; `report` prints and collects the figures,
//! `host` runs the hosts, `clients` is the HTTP and WebSocket load.

mod clients;
mod dispatch;
mod end_to_end;
mod fan_out;
mod host;
mod hot_swap;
mod idle;
mod publish;
mod replay;
mod report;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use report::Report;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Run every case briefly (checks the benchmark works; figures are rough).
    #[arg(long)]
    pub quick: bool,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run only these cases (repeatable): dispatch, publish, end-to-end, replay, hot-swap,
    /// fan-out, idle (footprint is measured with end-to-end).
    #[arg(long, value_parser = ["dispatch", "publish", "end-to-end", "replay", "hot-swap", "fan-out", "idle"])]
    pub only: Vec<String>,
    /// Events per `handle` call in the dispatch cases.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// WebSocket clients in the fan-out case.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Idle WebSocket clients in the idle case.
    #[arg(long, default_value_t = 10_000)]
    pub idle: usize,
    /// Events per second in the end-to-end case, and the highest the fan-out case tries
    /// (it tries 100, 200, 400, 700 and 1,000 below it).
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Where the built plugins are (`NAME.wasm`, or `NAME_WITH_UNDERSCORES.wasm`).
    #[arg(long, default_value = "plugins/target/wasm32-wasip2/release")]
    pub wasm_dir: PathBuf,
    /// Where the plugins' manifests are.
    #[arg(long, default_value = "plugins")]
    pub manifest_dir: PathBuf,
    /// The Iggy server binary for the Iggy cases [default: IGGY_SERVER_BIN,
    /// ../shared/iggy/iggy-server, PATH]; without one those cases are skipped, and say so.
    #[arg(long)]
    pub iggy_server: Option<PathBuf>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut report = Report::default();
    println!("Owlery benchmark — {} cores, {}{}", num_cpus(), machine(), if args.quick { " (--quick)" } else { "" });
    println!("{:<58} {:>22}   compared", "case", "figure");
    let wanted = |case: &str| args.only.is_empty() || args.only.iter().any(|c| c == case);
    if wanted("dispatch") {
        // Plugin calls block their thread on the runtime (as runner threads do).
        tokio::task::block_in_place(|| dispatch::dispatch(&args, &mut report))?;
    }
    let iggy = args.iggy_server.clone().or_else(owlery_testkit::iggy::find_binary);
    if wanted("publish") {
        publish::publish(&args, &mut report, iggy.as_deref()).await?;
    }
    if wanted("end-to-end") {
        end_to_end::end_to_end(&args, &mut report, iggy.as_deref()).await?;
    }
    if wanted("replay") {
        replay::replay(&args, &mut report).await?;
    }
    if wanted("hot-swap") {
        hot_swap::hot_swap(&args, &mut report).await?;
    }
    if wanted("fan-out") {
        fan_out::fan_out(&args, &mut report).await?;
    }
    if wanted("idle") {
        idle::idle(&args, &mut report).await?;
    }
    if let Some(path) = &args.json {
        report.write_json(path)?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

/// A built plugin's component: `NAME.wasm`, or with underscores as cargo names it.
fn wasm_path(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    for candidate in [name.to_owned(), name.replace('-', "_")] {
        let path = dir.join(format!("{candidate}.wasm"));
        if path.exists() {
            return Ok(path);
        }
    }
    bail!("{name}.wasm is not in {} (build the plugins first, e.g. ./demo.sh, or pass --wasm-dir)", dir.display())
}

/// A plugin's component bytes.
fn read_wasm(args: &BenchArgs, name: &str) -> anyhow::Result<Vec<u8>> {
    let path = wasm_path(&args.wasm_dir, name)?;
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn machine() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}
