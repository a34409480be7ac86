//! Turns the `OWLERY_SKIP_*` variables into cfg flags, so that a test whose outside part
//! is to be skipped is compiled as `#[ignore]`d: cargo's summary then counts it as ignored
//! instead of reporting a test that returned early as `ok`.

const SKIPS: [(&str, &str); 4] = [
    ("OWLERY_SKIP_IGGY", "owlery_skip_iggy"),
    ("OWLERY_SKIP_BROWSER", "owlery_skip_browser"),
    ("OWLERY_SKIP_NODE", "owlery_skip_node"),
    ("OWLERY_SKIP_PYTHON", "owlery_skip_python"),
];

fn main() {
    for (var, cfg) in SKIPS {
        println!("cargo::rerun-if-env-changed={var}");
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        if std::env::var(var).is_ok_and(|v| v == "1") {
            println!("cargo::rustc-cfg={cfg}");
            println!("cargo::warning=SKIPPED: tests that need what {var}=1 names are compiled as ignored");
        }
    }
}
