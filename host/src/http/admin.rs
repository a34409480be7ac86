//! The admin dashboard: the page (`GET /admin`, built into the binary; it holds no data and
//! asks for a token), and per plugin the chart of its throughput and lag over the last five
//! minutes (`GET /api/admin/charts/{name}.svg`, scope `admin`), drawn on the server with
//! `plotters` from samples a task takes every second (`Samples`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use plotters::prelude::*;

use super::plugins::lag;
use super::{ApiError, AppState};

/// Samples kept per plugin: five minutes at one a second.
const KEPT: usize = 300;
const EVERY: Duration = Duration::from_secs(1);

/// One second of one plugin: when (seconds since the sampler started), events handled per
/// second since the sample before, and its lag.
#[derive(Clone, Copy)]
struct Sample {
    at: f64,
    rate: f64,
    lag: u64,
}

/// Each plugin's recent samples.
#[derive(Default)]
pub struct Samples {
    series: Mutex<HashMap<String, (u64, VecDeque<Sample>)>>,
}

impl Samples {
    fn of(&self, plugin: &str) -> Vec<Sample> {
        let series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        series.get(plugin).map(|(_, s)| s.iter().copied().collect()).unwrap_or_default()
    }
}

/// Take a sample of every plugin each second, for as long as the host runs.
pub async fn sample_forever(state: AppState) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(EVERY);
    let mut last = Instant::now();
    loop {
        tick.tick().await;
        let elapsed = last.elapsed().as_secs_f64().max(0.001);
        last = Instant::now();
        let plugins = state.plugins.list();
        let mut taken = Vec::with_capacity(plugins.len());
        for (status, _) in plugins {
            taken.push((status.name.clone(), status.processed, lag(&state, &status).await));
        }
        let mut series = state.samples.series.lock().unwrap_or_else(|e| e.into_inner());
        series.retain(|name, _| taken.iter().any(|(n, ..)| n == name));
        for (name, processed, lag) in taken {
            let (before, samples) = series.entry(name).or_insert_with(|| (processed, VecDeque::new()));
            let rate = processed.saturating_sub(*before) as f64 / elapsed;
            *before = processed;
            samples.push_back(Sample { at: started.elapsed().as_secs_f64(), rate, lag });
            if samples.len() > KEPT {
                samples.pop_front();
            }
        }
    }
}

/// `GET /admin`: the dashboard page.
#[utoipa::path(get, path = "/admin", tag = "operate", responses((status = 200, description = "the dashboard page (HTML)")))]
pub(super) async fn page() -> impl IntoResponse {
    // Never inside another site's frame (its buttons act with the operator's token), and
    // nothing loaded from anywhere but this host (its script and style are inline; charts
    // arrive as blob: URLs).
    let policy = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                  img-src blob:; connect-src 'self'; frame-ancestors 'none'; form-action 'none'";
    ([(header::CONTENT_SECURITY_POLICY, policy), (header::X_FRAME_OPTIONS, "DENY")], Html(include_str!("admin.html")))
}

/// `GET /api/admin/charts/{name}.svg`: the plugin's events per second (blue, left axis)
/// and lag (red, right axis) over the last five minutes. Headers `x-owlery-samples` and
/// `x-owlery-peak-rate` say what was drawn.
#[utoipa::path(get, path = "/api/admin/charts/{file}", tag = "operate", params(("file" = String, Path, description = "NAME.svg")), responses((status = 200, description = "SVG chart", content_type = "image/svg+xml"), (status = 404, description = "no such plugin")))]
pub(super) async fn chart(State(state): State<AppState>, Path(file): Path<String>) -> Result<Response, ApiError> {
    let name = file
        .strip_suffix(".svg")
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "charts are NAME.svg").with("field", "name"))?;
    crate::plugins::check_name(name).map_err(|e| ApiError::bad_request(e.to_string()).with("field", "name"))?;
    state.plugins.status(name)?;
    let samples = state.samples.of(name);
    let peak = samples.iter().map(|s| s.rate).fold(0.0, f64::max);
    let svg = draw(name, &samples).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let mut response = ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response();
    let headers = response.headers_mut();
    headers.insert("x-owlery-samples", HeaderValue::from(samples.len()));
    headers.insert("x-owlery-peak-rate", HeaderValue::from_str(&format!("{peak:.1}")).expect("a number"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The chart, as SVG text.
fn draw(name: &str, samples: &[Sample]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560, 180)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let end = samples.last().map_or(KEPT as f64, |s| s.at);
        let start = end - KEPT as f64;
        let top_rate = samples.iter().map(|s| s.rate).fold(1.0, f64::max) * 1.1;
        let top_lag = samples.iter().map(|s| s.lag).max().unwrap_or(0).max(1) as f64 * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{name}: events/s and lag, last 5 minutes"), ("sans-serif", 14))
            .margin(6)
            .x_label_area_size(22)
            .y_label_area_size(48)
            .right_y_label_area_size(48)
            .build_cartesian_2d(start..end, 0.0..top_rate)
            .map_err(|e| e.to_string())?
            .set_secondary_coord(start..end, 0.0..top_lag);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|x| format!("{:.0}s", x - end))
            .y_desc("events/s")
            .draw()
            .map_err(|e| e.to_string())?;
        chart.configure_secondary_axes().y_desc("lag").draw().map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(samples.iter().map(|s| (s.at, s.rate)), BLUE.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        chart
            .draw_secondary_series(LineSeries::new(samples.iter().map(|s| (s.at, s.lag as f64)), RED.stroke_width(1)))
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}
