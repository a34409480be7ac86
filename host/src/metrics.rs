//! Prometheus metrics (`GET /metrics`, the text exposition format, through the `prometheus`
//! crate).
//!
//! Two kinds. What happens along the way (batch and publish durations, frames sent, slow
//! clients cut, Iggy forwards) is counted where it happens, in the process's one set of
//! metrics (`metrics()`), as Prometheus clients do. What a status already knows (per plugin
//! processed, errors, dead letters, lag, state bytes, swaps; clients connected; the
//! fan-out log's size; the Iggy spool) is read when scraped (`Scraped`), so there is one
//! source of truth for each figure and nothing to keep in step.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The Prometheus text format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Latency buckets from 100 µs to 10 s.
const SECONDS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// What is counted as it happens.
pub struct Metrics {
    registry: Registry,
    /// Time in a plugin's `handle` per batch, by plugin.
    pub batch_seconds: HistogramVec,
    /// Publish requests answered, by HTTP status.
    pub publish_requests: IntCounterVec,
    /// How long a publish request took to answer, by HTTP status.
    pub publish_seconds: HistogramVec,
    /// Frames written to clients, by transport (`websocket`, `socket.io`).
    pub frames_sent: IntCounterVec,
    /// Clients disconnected for falling too far behind, by transport.
    pub slow_clients_cut: IntCounterVec,
    /// From a spool round's send to Iggy's acknowledgement.
    pub iggy_forward_seconds: Histogram,
    /// Reads of Iggy's partitions, by what answered them: `iggy`, `kept` (records another
    /// reader had just read), `end` (known to hold nothing new).
    pub iggy_polls: IntCounterVec,
    /// Batches a catching-up plugin read ahead while handling the one before, by plugin and
    /// whether the read was `used` or `dropped`: what came next had changed (a command, a
    /// batch interrupted or not committed), or the read failed or found nothing (the end
    /// of a catch-up whose last batch was full).
    pub reads_ahead: IntCounterVec,
    /// Attempts at plugins' HTTP requests, by plugin and outcome (`delivered`, `retried`,
    /// `failed`).
    pub http_requests: IntCounterVec,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let vec = HistogramVec::new(HistogramOpts::new(name, help).buckets(SECONDS.to_vec()), labels)
                .expect("a valid histogram");
            registry.register(Box::new(vec.clone())).expect("registered once");
            vec
        };
        let counter = |name: &str, help: &str, labels: &[&str]| counter_in(&registry, name, help, labels);
        let batch_seconds =
            histogram("owlery_plugin_batch_duration_seconds", "Time in a plugin's handle per batch", &["plugin"]);
        let publish_requests = counter("owlery_publish_requests_total", "Publish requests answered", &["status"]);
        let publish_seconds =
            histogram("owlery_publish_duration_seconds", "Time to answer a publish request", &["status"]);
        let frames_sent = counter("owlery_frames_sent_total", "Frames written to clients", &["transport"]);
        let slow_clients_cut =
            counter("owlery_slow_clients_cut_total", "Clients disconnected for falling behind", &["transport"]);
        let iggy_forward_seconds = Histogram::with_opts(
            HistogramOpts::new("owlery_iggy_forward_duration_seconds", "From a send to Iggy to its acknowledgement")
                .buckets(SECONDS.to_vec()),
        )
        .expect("a valid histogram");
        registry.register(Box::new(iggy_forward_seconds.clone())).expect("registered once");
        let iggy_polls =
            counter("owlery_iggy_polls_total", "Reads of Iggy's partitions, by what answered them", &["answered"]);
        let reads_ahead = counter(
            "owlery_plugin_reads_ahead_total",
            "Batches read ahead while the batch before was handled, by plugin and outcome",
            &["plugin", "outcome"],
        );
        let http_requests = counter(
            "owlery_http_request_attempts_total",
            "Attempts at plugins' HTTP requests, by outcome",
            &["plugin", "outcome"],
        );
        Metrics {
            registry,
            batch_seconds,
            publish_requests,
            publish_seconds,
            frames_sent,
            slow_clients_cut,
            iggy_forward_seconds,
            iggy_polls,
            reads_ahead,
            http_requests,
        }
    }

    /// One publish request answered with `status` after `took`.
    pub fn publish_answered(&self, status: u16, took: Duration) {
        let status = status.to_string();
        self.publish_requests.with_label_values(&[&status]).inc();
        self.publish_seconds.with_label_values(&[&status]).observe(took.as_secs_f64());
    }

    /// `count` frames written to a client over `transport`.
    pub fn frames(&self, transport: &str, count: usize) {
        self.frames_sent.with_label_values(&[transport]).inc_by(count as u64);
    }
}

/// One plugin's figures, read from its status when scraped.
pub struct PluginFigures {
    pub name: String,
    pub state: &'static str,
    pub processed: u64,
    pub errors: u64,
    pub dead_letters: u64,
    pub lag: u64,
    pub state_bytes: u64,
    pub swaps: u64,
    /// HTTP requests taken in and not yet delivered or given up.
    pub http_pending: u64,
}

/// The Iggy side, when the log is Iggy.
pub struct IggyFigures {
    pub connected: bool,
    pub spool_depth: u64,
    pub spool_set_aside: u64,
}

/// What statuses know, read at scrape time.
pub struct Scraped {
    pub plugins: Vec<PluginFigures>,
    pub clients_connected: u64,
    pub fanout_records: u64,
    pub outbox_pending: u64,
    pub iggy: Option<IggyFigures>,
}

/// A counter with `labels`, registered in `registry`.
fn counter_in(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid counter");
    registry.register(Box::new(vec.clone())).expect("registered once");
    vec
}

/// Every metric, in the text format.
pub fn render(scraped: &Scraped) -> String {
    let now = Registry::new();
    let plugin = |name: &str, help: &str| counter_in(&now, name, help, &["plugin"]);
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        let vec = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid gauge");
        now.register(Box::new(vec.clone())).expect("registered once");
        vec
    };
    let single = |name: &str, help: &str, value: u64| {
        let one = IntGauge::new(name, help).expect("a valid gauge");
        one.set(value as i64);
        now.register(Box::new(one)).expect("registered once");
    };
    let processed = plugin("owlery_plugin_events_processed_total", "Events a plugin handled");
    let errors = plugin("owlery_plugin_errors_total", "Failed plugin calls");
    let dead = plugin("owlery_plugin_dead_letters_total", "Events a plugin dead-lettered");
    let swaps = plugin("owlery_plugin_swaps_total", "Versions swapped in while running");
    let lag = gauge("owlery_plugin_lag", "Events in the log the plugin has not handled", &["plugin"]);
    let state_bytes = gauge("owlery_plugin_state_bytes", "Bytes of a plugin's state (keys and values)", &["plugin"]);
    let state = gauge("owlery_plugin_state", "1 for the state the plugin is in", &["plugin", "state"]);
    let http_pending =
        gauge("owlery_http_requests_pending", "A plugin's HTTP requests waiting to be delivered", &["plugin"]);
    for p in &scraped.plugins {
        let name = [p.name.as_str()];
        processed.with_label_values(&name).inc_by(p.processed);
        errors.with_label_values(&name).inc_by(p.errors);
        dead.with_label_values(&name).inc_by(p.dead_letters);
        swaps.with_label_values(&name).inc_by(p.swaps);
        lag.with_label_values(&name).set(p.lag as i64);
        state_bytes.with_label_values(&name).set(p.state_bytes as i64);
        http_pending.with_label_values(&name).set(p.http_pending as i64);
        state.with_label_values(&[p.name.as_str(), p.state]).set(1);
    }
    single("owlery_clients_connected", "WebSocket and Socket.IO clients connected", scraped.clients_connected);
    single("owlery_fanout_log_records", "Broadcasts kept in the fan-out log for catch-up", scraped.fanout_records);
    single("owlery_outbox_pending", "Plugin output waiting for the log", scraped.outbox_pending);
    if let Some(iggy) = &scraped.iggy {
        single("owlery_iggy_connected", "1 while the host is connected to Iggy", u64::from(iggy.connected));
        single("owlery_iggy_spool_depth", "Accepted events waiting to be forwarded to Iggy", iggy.spool_depth);
        single("owlery_iggy_spool_set_aside", "Spool entries set aside", iggy.spool_set_aside);
    }
    let mut families = metrics().registry.gather();
    // The Iggy figures only where there is an Iggy.
    if scraped.iggy.is_none() {
        families.retain(|f| !f.name().starts_with("owlery_iggy_"));
    }
    families.extend(now.gather());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    TextEncoder::new().encode(&families, &mut out).expect("the text format encodes");
    String::from_utf8(out).expect("the text format is UTF-8")
}
