//! alerts: rules from the manifest's `[config]`; a firing rule publishes `alert.raised` and
//! broadcasts it to room `alerts`.
//!
//! - `severities = ["CRITICAL", "UNFORGIVABLE"]`: any `incident.created` or
//!   `severity.escalated` whose `data.severity` is one of them.
//! - `[[config.bursts]] count = N, window_seconds = W`: N `incident.created` in one
//!   `data.location` within W seconds of event time. The window restarts after it fires.
//! - `[[config.webhooks]] url = "...", format = "json" | "slack"`: every alert raised is
//!   also posted there (the manifest's `[capabilities] http` must allow the URL). `json`
//!   posts the alert itself; `slack` posts `{"text": ...}`, as Slack's incoming webhooks
//!   take it. A webhook the host refuses is logged and counted (see `query`); the alert is
//!   still raised.

use std::cell::RefCell;

use owlery_plugin_sdk::{Envelope, HandleError, LogLevel, Plugin, state};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize, Default)]
struct Config {
    #[serde(default)]
    severities: Vec<String>,
    #[serde(default)]
    bursts: Vec<Burst>,
    #[serde(default)]
    webhooks: Vec<Webhook>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Webhook {
    url: String,
    #[serde(default)]
    format: Format,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Format {
    #[default]
    Json,
    Slack,
}

#[derive(Deserialize)]
struct Burst {
    count: usize,
    window_seconds: i64,
}

thread_local! {
    static CONFIG: RefCell<Config> = RefCell::new(Config::default());
    /// Webhook posts the host refused since this instance started, and the last refusal.
    static REFUSED: RefCell<(u64, Option<String>)> = const { RefCell::new((0, None)) };
}

/// Seconds since the epoch from an RFC 3339 timestamp (UTC or with offset), without a
/// date library: days from the civil date, then the time of day and the offset.
fn epoch_seconds(ts: &str) -> Option<i64> {
    let b = ts.as_bytes();
    let num = |r: std::ops::Range<usize>| ts.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = 19;
    while rest < b.len() && (b[rest] == b'.' || b[rest].is_ascii_digit()) {
        rest += 1;
    }
    let offset = match b.get(rest) {
        Some(b'+') | Some(b'-') => {
            let sign = if b[rest] == b'+' { 1 } else { -1 };
            sign * (num(rest + 1..rest + 3)? * 3600 + num(rest + 4..rest + 6)? * 60)
        }
        _ => 0,
    };
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss - offset)
}

fn raise(event: &Envelope, alert: serde_json::Value, webhooks: &[Webhook]) -> Result<(), String> {
    owlery_plugin_sdk::publish(&event.event_id, "alert.raised", &alert)?;
    // Says what it is: Socket.IO clients get it as `alert:raised`, not as its cause's type.
    let mut shown = alert;
    shown["eventType"] = "alert.raised".into();
    owlery_plugin_sdk::broadcast(&event.event_id, "alerts", &shown.to_string())?;
    for webhook in webhooks {
        let body = match webhook.format {
            Format::Json => shown.clone(),
            Format::Slack => json!({ "text": slack_text(&shown) }),
        };
        if let Err(refused) = owlery_plugin_sdk::post_json(&event.event_id, &webhook.url, &body) {
            // A webhook misconfigured must not silence the alert itself.
            owlery_plugin_sdk::log(LogLevel::Error, &format!("webhook refused: {refused}"));
            REFUSED.with_borrow_mut(|(count, last)| {
                *count += 1;
                *last = Some(refused);
            });
        }
    }
    Ok(())
}

/// One line for a chat channel: `:rotating_light: CRITICAL incident (incident.created) · incident 42`.
fn slack_text(alert: &serde_json::Value) -> String {
    let message = alert["message"].as_str().unwrap_or("alert");
    match &alert["incidentId"] {
        serde_json::Value::Null => format!(":rotating_light: {message}"),
        serde_json::Value::String(id) if id.is_empty() => format!(":rotating_light: {message}"),
        serde_json::Value::String(id) => format!(":rotating_light: {message} · incident {id}"),
        id => format!(":rotating_light: {message} · incident {id}"),
    }
}

fn check(event: &Envelope, config: &Config) -> Result<(), String> {
    let data = event.data_json();
    let severity = data.get("severity").and_then(|s| s.as_str()).unwrap_or_default();
    let incident = data.get("id").or_else(|| data.get("incidentId")).cloned().unwrap_or_default();
    if matches!(event.event_type.as_str(), "incident.created" | "severity.escalated")
        && config.severities.iter().any(|s| s.eq_ignore_ascii_case(severity))
    {
        raise(
            event,
            json!({
                "rule": "severity",
                "message": format!("{severity} incident ({})", event.event_type),
                "severity": severity,
                "incidentId": incident,
                "sourceEventId": event.event_id,
                "timestamp": event.timestamp,
            }),
            &config.webhooks,
        )?;
    }
    if event.event_type != "incident.created" || config.bursts.is_empty() {
        return Ok(());
    }
    let Some(location) = data.get("location").and_then(|l| l.as_str()) else { return Ok(()) };
    let Some(at) = epoch_seconds(&event.timestamp) else { return Ok(()) };
    for (rule, burst) in config.bursts.iter().enumerate() {
        let key = format!("burst:{rule}:{location}");
        let mut times: Vec<i64> = state::get_json(&key).unwrap_or_default();
        times.retain(|t| at - *t < burst.window_seconds);
        times.push(at);
        if times.len() >= burst.count {
            raise(
                event,
                json!({
                    "rule": "burst",
                    "message": format!("{} incidents in {} within {}s", times.len(), location, burst.window_seconds),
                    "location": location,
                    "count": times.len(),
                    "windowSeconds": burst.window_seconds,
                    "incidentId": incident,
                    "sourceEventId": event.event_id,
                    "timestamp": event.timestamp,
                }),
                &config.webhooks,
            )?;
            state::delete(&key);
        } else {
            state::set_json(&key, &times);
        }
    }
    Ok(())
}

struct Alerts;

impl Plugin for Alerts {
    fn init(config: String) -> Result<(), String> {
        let parsed: Config = serde_json::from_str(&config).map_err(|e| format!("alerts config: {e}"))?;
        if parsed.bursts.iter().any(|b| b.count == 0 || b.window_seconds <= 0) {
            return Err("alerts config: bursts need count > 0 and window_seconds > 0".to_owned());
        }
        if parsed.webhooks.iter().any(|w| w.url.is_empty()) {
            return Err("alerts config: a webhook needs a url".to_owned());
        }
        CONFIG.with_borrow_mut(|c| *c = parsed);
        Ok(())
    }

    fn handle(batch: Vec<Envelope>) -> Result<(), HandleError> {
        CONFIG.with_borrow(|config| {
            for (index, event) in batch.iter().enumerate() {
                check(event, config).map_err(|e| HandleError::at(index, e))?;
            }
            Ok(())
        })
    }

    fn query(_request: String) -> Result<String, String> {
        let (refused, last_refusal) = REFUSED.with_borrow(|r| r.clone());
        CONFIG.with_borrow(|c| {
            Ok(json!({
                "severities": c.severities,
                "bursts": c.bursts.iter().map(|b| json!({"count": b.count, "windowSeconds": b.window_seconds})).collect::<Vec<_>>(),
                // How many, not where: a webhook URL is a secret.
                "webhooks": c.webhooks.len(),
                "webhookRefusals": refused,
                "lastWebhookRefusal": last_refusal,
            })
            .to_string())
        })
    }
}

owlery_plugin_sdk::export!(Alerts);
