//! The figures of one run: each printed as a table row when measured and kept under its
//! key for `--json`; and the small statistics the cases share.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

/// The latency percentiles a case reports: (fraction, key suffix, label).
const PERCENTILES: [(f64, &str, &str); 3] = [(0.5, "p50", "p50"), (0.99, "p99", "p99"), (0.999, "p999", "p99.9")];

#[derive(Default)]
pub(super) struct Report {
    figures: BTreeMap<String, Value>,
}

impl Report {
    pub(super) fn add(&mut self, key: &str, label: &str, value: f64, unit: &str, compare: String) {
        let shown = if value >= 100.0 { format!("{value:.0} {unit}") } else { format!("{value:.2} {unit}") };
        println!("{label:<58} {shown:>22}   {compare}");
        self.figures.insert(key.to_owned(), json!((value * 100.0).round() / 100.0));
    }

    /// A case that did not run, and why.
    pub(super) fn note(&mut self, key: &str, text: &str) {
        println!("{:<58} {:>22}   {text}", key, "-");
        self.figures.insert(key.to_owned(), Value::String(text.to_owned()));
    }

    /// p50, p99 and p99.9 of `sorted_ms` as `KEY.pNN_ms` ("LABEL: latency pNN"), each with
    /// `compare(fraction, label)` beside it.
    pub(super) fn latencies(
        &mut self,
        key: &str,
        label: &str,
        sorted_ms: &[f64],
        compare: impl Fn(f64, &str) -> String,
    ) {
        for (fraction, suffix, point) in PERCENTILES {
            self.add(
                &format!("{key}.{suffix}_ms"),
                &format!("{label}: latency {point}"),
                percentile(sorted_ms, fraction),
                "ms",
                compare(fraction, point),
            );
        }
    }

    pub(super) fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(&self.figures)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// `a / b` as "N.NNx", or "-" when there is no `b`.
pub(super) fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 { format!("{:.2}x", a / b) } else { "-".into() }
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(super) fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v
}
