//! The hosts the bench measures: `owlery serve` child processes of this very binary, with
//! some of the built plugins, on the embedded log or an Iggy server.

use std::time::{Duration, Instant};

use anyhow::bail;
use owlery_testkit::{HostProcess, IggyServer};
use serde_json::Value;

use super::{BenchArgs, wasm_path};

pub(super) struct BenchHost {
    /// Declared before `_dir`: the process goes before its directory does.
    process: HostProcess,
    _dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`.
    pub(super) base: String,
}

impl BenchHost {
    /// A host running `plugins` (with their manifests from `--manifest-dir`, where there are
    /// any), on `iggy` when given, else on the embedded log.
    pub(super) fn start(args: &BenchArgs, plugins: &[&str], iggy: Option<&IggyServer>) -> anyhow::Result<BenchHost> {
        Self::start_with(args, plugins, iggy, None)
    }

    /// `start`, with `owlery_toml` as the host's configuration file.
    pub(super) fn start_with(
        args: &BenchArgs,
        plugins: &[&str],
        iggy: Option<&IggyServer>,
        owlery_toml: Option<&str>,
    ) -> anyhow::Result<BenchHost> {
        let dir = tempfile::tempdir()?;
        // OWLERY_BENCH_HOST_LOG=<filter> shows the hosts' logs (with that RUST_LOG filter).
        let host_log = std::env::var("OWLERY_BENCH_HOST_LOG").ok();
        let mut process = HostProcess::new(std::env::current_exe()?, dir.path())?
            .rust_log(host_log.as_deref().unwrap_or("warn"))
            .show_log(host_log.is_some());
        if let Some(iggy) = iggy {
            process = process.env(iggy.host_env());
        }
        if let Some(text) = owlery_toml {
            process.write_config(text)?;
        }
        for name in plugins {
            let manifest_path = args.manifest_dir.join(format!("{name}.toml"));
            let manifest = if manifest_path.exists() { Some(std::fs::read_to_string(&manifest_path)?) } else { None };
            process.add_plugin(name, &wasm_path(&args.wasm_dir, name)?, manifest.as_deref())?;
        }
        let base = process.start()?;
        Ok(BenchHost { process, _dir: dir, base })
    }

    /// The host's resident memory, MB.
    pub(super) fn rss_mb(&self) -> f64 {
        let Some(pid) = self.process.id() else { return 0.0 };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// A plugin's status, as `GET /api/plugins/NAME` answers it.
    pub(super) async fn plugin(&self, http: &reqwest::Client, name: &str) -> anyhow::Result<Value> {
        Ok(http.get(format!("{}/api/plugins/{name}", self.base)).send().await?.json().await?)
    }

    /// Wait until `name` has processed at least `processed` events and has no lag.
    pub(super) async fn wait_caught_up(
        &self,
        http: &reqwest::Client,
        name: &str,
        processed: u64,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let status = self.plugin(http, name).await?;
            if status["lag"] == 0 && status["processed"].as_u64().unwrap_or(0) >= processed {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{name} did not catch up: {status}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
