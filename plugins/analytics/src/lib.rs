//! analytics: live counts over the event stream.
//!
//! Counts by event type, by source, by severity (`data.severity`) and per minute (from the
//! event's own timestamp, so a replay rebuilds the same buckets), and open incidents by
//! severity (`incident.created` minus `incident.resolved`, matched by incident id).
//! `query` returns the whole picture as JSON.
//!
//! State stays bounded whatever producers send: the summary (one state value) keeps at
//! most `MAX_DISTINCT` distinct event types, sources and severities (the rest counted under
//! `(other)`) and `MAX_MINUTES` minutes; each open incident is a state key of its own
//! (`open/<id>`), as is each incident resolved before its creation was seen (`early/<id>`),
//! so a month of incidents never makes one value outgrow the host's limit.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use owlery_plugin_sdk::{Envelope, HandleError, Plugin, state};
use serde::{Deserialize, Serialize};

const STATE_KEY: &str = "analytics";
/// Per-minute buckets kept (one day); older ones are dropped.
const MAX_MINUTES: usize = 1440;
/// Distinct event types, sources and severities counted each; more go to `OTHER`.
const MAX_DISTINCT: usize = 1000;
const OTHER: &str = "(other)";
/// Incident ids longer than this are counted but not tracked (a state key has a limit).
const MAX_ID_BYTES: usize = 512;

#[derive(Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Counts {
    total: u64,
    by_event_type: BTreeMap<String, u64>,
    by_source: BTreeMap<String, u64>,
    by_severity: BTreeMap<String, u64>,
    per_minute: BTreeMap<String, u64>,
    open_by_severity: BTreeMap<String, u64>,
    /// Earlier versions kept open incidents here: moved to their own keys on first use.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    open_incidents: BTreeMap<String, String>,
    /// Likewise for incidents resolved before their creation was seen.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    resolved_early: BTreeSet<String>,
}

thread_local! {
    /// Loaded from state on first use. The host discards this instance after any failed
    /// batch, so memory never runs ahead of the committed state.
    static COUNTS: RefCell<Option<Counts>> = const { RefCell::new(None) };
}

/// The parts of `data` analytics reads; the rest is skipped unparsed (a typed read of
/// three fields costs a fraction of building the whole value).
#[derive(Default, Deserialize)]
struct Data {
    #[serde(default)]
    id: Option<Id>,
    #[serde(default, rename = "incidentId")]
    incident_id: Option<Id>,
    #[serde(default)]
    severity: Option<serde_json::Value>,
}

/// An incident id as producers send it: a string or a number (anything else is no id).
#[derive(Deserialize)]
#[serde(untagged)]
enum Id {
    Text(String),
    Number(serde_json::Number),
    Other(serde::de::IgnoredAny),
}

impl Data {
    fn of(event: &Envelope) -> Data {
        serde_json::from_str(&event.data).unwrap_or_default()
    }

    fn incident_id(&self) -> Option<String> {
        // `id` first, `incidentId` when `id` is missing (as ws-broadcast reads them).
        let id = match self.id.as_ref().or(self.incident_id.as_ref())? {
            Id::Text(s) => s.clone(),
            Id::Number(n) => n.to_string(),
            Id::Other(_) => return None,
        };
        (id.len() <= MAX_ID_BYTES).then_some(id)
    }

    fn severity(&self) -> Option<&str> {
        self.severity.as_ref()?.as_str()
    }
}

/// Count one under `key`, or under `OTHER` once `MAX_DISTINCT` keys are counted.
fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    // Found without allocating, the usual case.
    if let Some(n) = map.get_mut(key) {
        *n += 1;
        return;
    }
    let key = if map.len() < MAX_DISTINCT { key } else { OTHER };
    *map.entry(key.to_owned()).or_default() += 1;
}

fn open_key(id: &str) -> String {
    format!("open/{id}")
}

fn early_key(id: &str) -> String {
    format!("early/{id}")
}

impl Counts {
    fn apply(&mut self, event: &Envelope) {
        self.total += 1;
        bump(&mut self.by_event_type, &event.event_type);
        bump(&mut self.by_source, &event.source);
        if let Some(minute) = event.timestamp.get(..16) {
            match self.per_minute.get_mut(minute) {
                Some(n) => *n += 1,
                None => {
                    self.per_minute.insert(minute.to_owned(), 1);
                    while self.per_minute.len() > MAX_MINUTES {
                        self.per_minute.pop_first();
                    }
                }
            }
        }
        let data = Data::of(event);
        let severity = data.severity();
        if let Some(severity) = severity {
            bump(&mut self.by_severity, severity);
        }
        match event.event_type.as_str() {
            "incident.created" => {
                let severity = severity.unwrap_or("UNKNOWN").to_owned();
                let id = data.incident_id().unwrap_or_else(|| event.event_id.clone());
                if state::get(&early_key(&id)).is_some() {
                    state::delete(&early_key(&id));
                    return;
                }
                if let Some(previous) = state::get(&open_key(&id)) {
                    self.close(&String::from_utf8_lossy(&previous));
                }
                state::set(&open_key(&id), severity.as_bytes());
                bump(&mut self.open_by_severity, &severity);
            }
            "incident.resolved" => {
                let Some(id) = data.incident_id() else { return };
                match state::get(&open_key(&id)) {
                    Some(previous) => {
                        state::delete(&open_key(&id));
                        self.close(&String::from_utf8_lossy(&previous));
                    }
                    None => state::set(&early_key(&id), b""),
                }
            }
            _ => {}
        }
    }

    fn close(&mut self, severity: &str) {
        let severity = if self.open_by_severity.contains_key(severity) { severity } else { OTHER };
        if let Some(n) = self.open_by_severity.get_mut(severity) {
            *n -= 1;
            if *n == 0 {
                self.open_by_severity.remove(severity);
            }
        }
    }

    /// Move what earlier versions kept in the summary to keys of their own.
    fn migrate(&mut self) {
        for (id, severity) in std::mem::take(&mut self.open_incidents) {
            state::set(&open_key(&id), severity.as_bytes());
        }
        for id in std::mem::take(&mut self.resolved_early) {
            state::set(&early_key(&id), b"");
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
            counts.migrate();
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
