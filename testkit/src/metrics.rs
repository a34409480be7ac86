//! Figures read out of a host's `GET /metrics` (Prometheus text format), for the bench and
//! the end-to-end tests alike: one reader, so both see a series the same way whatever the
//! order the host writes its labels in.

/// The sum of the samples of metric `name` whose labels include every `(label, value)` of
/// `labels` (in any order; others may be there too); 0 when there is none yet. A metric
/// whose name only starts with `name` is another metric and is not counted.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    // Escaped as the host's encoder writes label values, so a value with a quote,
    // backslash or newline is found too.
    let wanted: Vec<String> = labels
        .iter()
        .map(|(label, value)| {
            let value = value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
            format!("{label}=\"{value}\"")
        })
        .collect();
    // `# HELP` and `# TYPE` lines never start with a metric's name, so need no filter.
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            // `name{labels} value` or `name value`: split the labels off at the last brace,
            // since a label's value may hold a space.
            let (series_labels, value) = match rest.strip_prefix('{') {
                Some(inner) => inner.rsplit_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            let parsed: Vec<&str> = split_labels(series_labels);
            wanted.iter().all(|label| parsed.contains(&label.as_str())).then_some(value)
        })
        .filter_map(|value| value.split_whitespace().next()?.parse::<f64>().ok())
        .sum()
}

/// `a="1",b="2"` as `["a=\"1\"", "b=\"2\""]`; commas inside a quoted value stay in it.
fn split_labels(labels: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (at, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&labels[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    if start < labels.len() {
        parts.push(&labels[start..]);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP owlery_plugin_reads_ahead_total Batches read ahead.
# TYPE owlery_plugin_reads_ahead_total counter
owlery_plugin_reads_ahead_total{outcome=\"used\",plugin=\"analytics\"} 1953
owlery_plugin_reads_ahead_total{outcome=\"dropped\",plugin=\"analytics\"} 2
owlery_plugin_reads_ahead_total{outcome=\"used\",plugin=\"ws-broadcast\"} 10
owlery_plugin_reads_ahead_total_extra{outcome=\"used\",plugin=\"analytics\"} 99
owlery_iggy_polls_total{answered=\"iggy\"} 1500
owlery_iggy_polls_total{answered=\"kept\"} 1900
owlery_odd_total{note=\"a, b\",plugin=\"analytics\"} 3
owlery_odd_total{myplugin=\"analytics\"} 5
owlery_odd_total{path=\"C:\\\\x\",say=\"\\\"hi\\\"\"} 7
owlery_up 1
";

    #[test]
    fn labels_match_in_any_order_and_other_metrics_are_not_counted() {
        let used = [("plugin", "analytics"), ("outcome", "used")];
        assert_eq!(sum(TEXT, "owlery_plugin_reads_ahead_total", &used), 1953.0);
        assert_eq!(sum(TEXT, "owlery_plugin_reads_ahead_total", &[("outcome", "used")]), 1963.0);
        assert_eq!(sum(TEXT, "owlery_plugin_reads_ahead_total", &[]), 1965.0);
        assert_eq!(sum(TEXT, "owlery_iggy_polls_total", &[("answered", "kept")]), 1900.0);
    }

    #[test]
    fn a_series_not_there_yet_is_zero() {
        assert_eq!(sum(TEXT, "owlery_missing_total", &[]), 0.0);
        assert_eq!(sum(TEXT, "owlery_iggy_polls_total", &[("answered", "never")]), 0.0);
        // A label only matches whole: `myplugin="analytics"` is not `plugin="analytics"`
        // (a reader looking for the text inside the line counted it), nor is a value a
        // part of another.
        assert_eq!(sum(TEXT, "owlery_odd_total", &[("plugin", "analytics")]), 3.0);
        assert_eq!(sum(TEXT, "owlery_odd_total", &[("note", "a")]), 0.0);
    }

    #[test]
    fn unlabelled_series_quoted_commas_and_escaped_values() {
        assert_eq!(sum(TEXT, "owlery_up", &[]), 1.0);
        assert_eq!(sum(TEXT, "owlery_odd_total", &[("path", "C:\\x"), ("say", "\"hi\"")]), 7.0);
        assert_eq!(sum(TEXT, "owlery_odd_total", &[("note", "a, b"), ("plugin", "analytics")]), 3.0);
    }
}
