//! Builds the plugins (`plugins/`) and the test plugins (`tests/plugins/`) for
//! wasm32-wasip2, so that a plain `cargo test` has every guest, and writes their paths.
//!
//! The inner cargo gets a target directory under OUT_DIR so it never waits on the outer
//! build's lock, and none of the outer build's flags.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root =
        manifest_dir.parent().and_then(Path::parent).expect("tests/guests sits two levels below the root").to_owned();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target_dir = out.join("wasm");
    ensure_target();

    let workspaces = [root.join("plugins"), root.join("tests/plugins")];
    for ws in &workspaces {
        build(ws, &target_dir);
    }
    for watched in [
        "wit",
        "plugins/Cargo.toml",
        "plugins/Cargo.lock",
        "plugins/sdk",
        "plugins/ws-broadcast",
        "plugins/analytics",
        "plugins/alerts",
        "plugins/noop",
        "tests/plugins/Cargo.toml",
        "tests/plugins/Cargo.lock",
        "tests/plugins/misbehave",
        "tests/plugins/wrong-world",
        "tests/plugins/big-memory",
        "tests/plugins/other-contract",
        "tests/plugins/contract-0-2-0",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }

    let wasm = |name: &str| target_dir.join(TARGET).join("release").join(format!("{name}.wasm"));
    let mut paths = String::new();
    for (constant, file) in [
        ("WS_BROADCAST", "ws_broadcast"),
        ("ANALYTICS", "analytics"),
        ("ALERTS", "alerts"),
        ("MISBEHAVE", "misbehave"),
        ("WRONG_WORLD", "wrong_world"),
        ("BIG_MEMORY", "big_memory"),
        ("OTHER_CONTRACT", "other_contract"),
        ("CONTRACT_0_2_0", "contract_0_2_0"),
        ("NOOP", "noop"),
    ] {
        let path = wasm(file);
        assert!(path.exists(), "{} was not built", path.display());
        paths.push_str(&format!("pub const {constant}: &str = {:?};\n", path.display().to_string()));
    }
    // The JavaScript plugin, beside the others (so `owlery bench --wasm-dir` finds it too).
    let presence = build_js(&root, &wasm("presence"));
    paths.push_str(&format!("pub const PRESENCE: Option<&str> = {presence:?};\n"));
    paths.push_str(&format!("pub const PLUGINS_DIR: &str = {:?};\n", root.join("plugins").display().to_string()));
    paths.push_str(&format!(
        "pub const TEST_PLUGINS_DIR: &str = {:?};\n",
        root.join("tests/plugins").display().to_string()
    ));
    paths.push_str(&format!("pub const TEST_NODE_DIR: &str = {:?};\n", root.join("tests/node").display().to_string()));
    std::fs::write(out.join("paths.rs"), paths).unwrap();
}

/// Build `plugins/js/presence` with componentize-js (`plugins/js/sdk/build.mjs`) into `out`,
/// when node and the npm packages `./test.sh` installs there (`npm ci`) are present; `None`
/// otherwise, or with `OWLERY_SKIP_NODE=1` (the tests that need it then fail, or are
/// skipped, and say why).
fn build_js(root: &Path, out: &Path) -> Option<String> {
    let js = root.join("plugins/js");
    for watched in ["sdk", "presence", "package-lock.json", "node_modules/.package-lock.json"] {
        println!("cargo:rerun-if-changed={}", js.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=OWLERY_SKIP_NODE");
    if std::env::var("OWLERY_SKIP_NODE").is_ok_and(|v| v == "1") {
        return None;
    }
    if !js.join("node_modules/@bytecodealliance/componentize-js").exists() {
        println!(
            "cargo:warning=plugins/js has no node_modules: run ./test.sh (npm ci there) to build the JavaScript plugin"
        );
        return None;
    }
    let status = Command::new("node")
        .arg(js.join("sdk/build.mjs"))
        .arg(js.join("presence/presence.js"))
        .arg(out)
        .current_dir(&js)
        .status();
    assert!(status.is_ok_and(|s| s.success()), "building plugins/js/presence with componentize-js failed");
    Some(out.display().to_string())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for var in
        ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTC_WORKSPACE_WRAPPER"]
    {
        cmd.env_remove(var);
    }
    cmd
}

fn build(workspace: &Path, target_dir: &Path) {
    let status = cargo()
        .args(["build", "--release", "--locked", "--target", TARGET, "--manifest-path"])
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .expect("running cargo for the guests");
    assert!(status.success(), "building the guests in {} failed", workspace.display());
}

/// The wasm32-wasip2 standard library must be installed; install it with rustup if not.
fn ensure_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let libdir = Command::new(&rustc).args(["--print", "target-libdir", "--target", TARGET]).output();
    let installed = libdir
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| Path::new(String::from_utf8_lossy(&o.stdout).trim()).exists());
    if installed {
        return;
    }
    println!("cargo:warning=installing the {TARGET} target with rustup");
    let added = Command::new("rustup").args(["target", "add", TARGET]).status();
    assert!(added.is_ok_and(|s| s.success()), "the {TARGET} target is missing: run `rustup target add {TARGET}`");
}
