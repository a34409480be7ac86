//! `owlery bench --quick` runs every case and writes every figure (no timing assertions:
//! figures are for people, not for pass/fail). Only with the `bench` feature, which builds
//! the subcommand.
#![cfg(feature = "bench")]

use std::path::Path;

use crate::support::guests;

/// Whether the Iggy tests are skipped (`OWLERY_SKIP_IGGY=1` when the tests were built; the
/// cfg is the `owlery` package's, set by `host/build.rs`).
const IGGY_SKIPPED: bool = cfg!(owlery_skip_iggy);

#[tokio::test(flavor = "multi_thread")]
async fn the_benchmark_runs_every_case_and_writes_its_figures() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("figures.json");
    let wasm_dir = Path::new(guests::ANALYTICS).parent().unwrap();
    // Iggy's cases run unless the Iggy tests are skipped (OWLERY_SKIP_IGGY=1).
    let iggy = (!IGGY_SKIPPED).then(owlery_testkit::iggy::locate);
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_owlery"));
    command.args(["bench", "--quick", "--clients", "20"]);
    if let Some(binary) = &iggy {
        command.arg("--iggy-server").arg(binary);
    }
    let output = command
        .arg("--json")
        .arg(&json)
        .arg("--wasm-dir")
        .arg(wasm_dir)
        .arg("--manifest-dir")
        .arg(guests::PLUGINS_DIR)
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "bench failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let figures: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for key in [
        "dispatch.noop.wasm_events_per_sec",
        "dispatch.noop.native_events_per_sec",
        "dispatch.analytics.wasm_events_per_sec",
        "dispatch.analytics.native_events_per_sec",
        "publish.embedded.p50_ms",
        "publish.embedded.p99_ms",
        "publish.embedded.p999_ms",
        "publish.embedded.events_per_sec",
        "e2e.embedded.p99_ms",
        "replay.analytics_seconds",
        "replay.resume_100_ms",
        "hot_swap.pause_ms",
        "fanout.r200.p99_ms",
        "idle.rss_per_connection_kb",
        "footprint.idle_rss_mb",
        "footprint.load_rss_mb",
    ] {
        let value = &figures[key];
        assert!(value.as_f64().is_some_and(|v| v > 0.0), "{key} = {value} in\n{stdout}");
    }
    // A number when the rate tried met the bound, else a note saying it did not.
    assert!(!figures["fanout.capacity_events_per_sec"].is_null(), "{stdout}");
    if iggy.is_some() {
        for key in [
            "publish.iggy.events_per_sec",
            "publish.iggy.p99_ms",
            "publish.iggy_cold.p99_ms",
            "publish.iggy_http.events_per_sec",
            "e2e.iggy.p99_ms",
        ] {
            assert!(figures[key].as_f64().is_some_and(|v| v > 0.0), "{key} in\n{stdout}");
        }
    }
    // The JavaScript plugin's dispatch, beside the Rust ones, whenever it was built (it is
    // unless OWLERY_SKIP_NODE=1; the presence tests fail when it is missing otherwise).
    if guests::PRESENCE.is_some() {
        let rate = &figures["dispatch.presence.wasm_events_per_sec"];
        assert!(rate.as_f64().is_some_and(|v| v > 0.0), "presence dispatch = {rate} in\n{stdout}");
    }
    assert!(stdout.contains("of native") && stdout.contains("of Iggy's HTTP API"), "{stdout}");
}
