//! analytics: live counts over the event stream.
//!
//! Counts by event type, by source, by severity (`data.severity`) and per minute (from the
//! event's own timestamp, so a replay rebuilds the same buckets), and open incidents by
//! severity (`incident.created` minus `incident.resolved`, matched by incident id).
//! `query` returns the whole picture as JSON.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use owlery_plugin_sdk::{Envelope, HandleError, Plugin, state};
use serde::{Deserialize, Serialize};

const STATE_KEY: &str = "analytics";
/// Per-minute buckets kept (one day); older ones are dropped.
const MAX_MINUTES: usize = 1440;

#[derive(Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Counts {
    total: u64,
    by_event_type: BTreeMap<String, u64>,
    by_source: BTreeMap<String, u64>,
    by_severity: BTreeMap<String, u64>,
    per_minute: BTreeMap<String, u64>,
    open_by_severity: BTreeMap<String, u64>,
    /// incident id → severity, for incidents created and not yet resolved.
    open_incidents: BTreeMap<String, String>,
    /// Incidents resolved before their creation was seen: events of one incident may sit
    /// in different partitions, and partitions are read independently.
    #[serde(default)]
    resolved_early: BTreeSet<String>,
}

thread_local! {
    /// Loaded from state on first use. The host discards this instance after any failed
    /// batch, so memory never runs ahead of the committed state.
    static COUNTS: RefCell<Option<Counts>> = const { RefCell::new(None) };
}

fn incident_id(data: &serde_json::Value) -> Option<String> {
    match data.get("id").or_else(|| data.get("incidentId"))? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Counts {
    fn apply(&mut self, event: &Envelope) {
        self.total += 1;
        *self.by_event_type.entry(event.event_type.clone()).or_default() += 1;
        *self.by_source.entry(event.source.clone()).or_default() += 1;
        if let Some(minute) = event.timestamp.get(..16) {
            *self.per_minute.entry(minute.to_owned()).or_default() += 1;
            while self.per_minute.len() > MAX_MINUTES {
                self.per_minute.pop_first();
            }
        }
        let data = event.data_json();
        let severity = data.get("severity").and_then(|s| s.as_str()).map(str::to_owned);
        if let Some(severity) = &severity {
            *self.by_severity.entry(severity.clone()).or_default() += 1;
        }
        match event.event_type.as_str() {
            "incident.created" => {
                let severity = severity.unwrap_or_else(|| "UNKNOWN".to_owned());
                let id = incident_id(&data).unwrap_or_else(|| event.event_id.clone());
                if self.resolved_early.remove(&id) {
                    return;
                }
                if let Some(previous) = self.open_incidents.insert(id, severity.clone()) {
                    self.close(&previous);
                }
                *self.open_by_severity.entry(severity).or_default() += 1;
            }
            "incident.resolved" => {
                let Some(id) = incident_id(&data) else { return };
                match self.open_incidents.remove(&id) {
                    Some(previous) => self.close(&previous),
                    None => {
                        self.resolved_early.insert(id);
                    }
                }
            }
            _ => {}
        }
    }

    fn close(&mut self, severity: &str) {
        if let Some(n) = self.open_by_severity.get_mut(severity) {
            *n -= 1;
            if *n == 0 {
                self.open_by_severity.remove(severity);
            }
        }
    }
}

fn with_counts<R>(f: impl FnOnce(&mut Counts) -> R) -> R {
    COUNTS.with_borrow_mut(|slot| f(slot.get_or_insert_with(|| state::get_json(STATE_KEY).unwrap_or_default())))
}

struct Analytics;

impl Plugin for Analytics {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn handle(batch: Vec<Envelope>) -> Result<(), HandleError> {
        with_counts(|counts| {
            for event in &batch {
                counts.apply(event);
            }
            state::set_json(STATE_KEY, counts);
        });
        Ok(())
    }

    fn query(request: String) -> Result<String, String> {
        let request: serde_json::Value = serde_json::from_str(&request).map_err(|e| e.to_string())?;
        with_counts(|counts| {
            let mut view = serde_json::to_value(&*counts).map_err(|e| e.to_string())?;
            let object = view.as_object_mut().expect("counts serialise to an object");
            object.remove("openIncidents");
            object.remove("resolvedEarly");
            // `?view=byEventType` narrows the answer to one part.
            if let Some(part) = request.get("view").and_then(|v| v.as_str()) {
                let value = object.remove(part).ok_or_else(|| format!("unknown view {part:?}"))?;
                return Ok(serde_json::json!({ part: value }).to_string());
            }
            Ok(view.to_string())
        })
    }
}

owlery_plugin_sdk::export!(Analytics);
