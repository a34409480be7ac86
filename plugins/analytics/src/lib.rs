//! analytics: live counts over the event stream.
//!
//! Counts by event type, by source, by severity (`data.severity`) and per minute (from the
//! event's own timestamp, so a replay rebuilds the same buckets), and open incidents by
//! severity (`incident.created` minus `incident.resolved`, matched by incident id).
//! `query` returns the whole picture as JSON.
//!
//! State stays bounded whatever producers send: the summary (one state value) keeps at
//! most `MAX_DISTINCT` distinct event types, sources and severities (the rest counted under
//! `(other)`), each name at most `MAX_KEY_BYTES` (a longer one is cut and ends in `…`), and
//! `MAX_MINUTES` minutes, so it can never outgrow the host's limit on one value (see
//! `SUMMARY_WORST_CASE`); each open incident is a state key of its own (`open/<id>`), as is
//! each incident resolved before its creation was seen (`early/<id>`), so a month of
//! incidents never makes one value outgrow the host's limit either.

use std::borrow::Cow;
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
/// The longest name (event type, source, severity) the summary keeps, in bytes as written
/// in its JSON (escapes included). Without it, 1,000 sources of a kilobyte each would be
/// over a megabyte, and the plugin would fail on every batch from then on.
const MAX_KEY_BYTES: usize = 128;
/// The end of a name cut to `MAX_KEY_BYTES`, so a cut one is never taken for a whole one.
const CUT: &str = "…";
/// The largest the summary can be, in bytes of JSON: four maps (event types, sources,
/// severities, open by severity) of `MAX_DISTINCT` names and `(other)`, an entry being a
/// quoted name, a colon, a count of up to 20 digits and a comma; `MAX_MINUTES` minutes, an
/// entry's name 16 bytes of timestamp (96 should every byte need escaping); under 200 bytes
/// for the total and the field names. 781,608 bytes: three quarters of the host's limit.
const SUMMARY_WORST_CASE: usize =
    4 * (MAX_DISTINCT + 1) * (MAX_KEY_BYTES + 2 + 1 + 20 + 1) + MAX_MINUTES * (16 * 6 + 2 + 1 + 20 + 1) + 200;
/// The host's limit on one state value (its `CallLimits::state_value`, 1 MiB).
const HOST_VALUE_LIMIT: usize = 1 << 20;
const _: () = assert!(SUMMARY_WORST_CASE < HOST_VALUE_LIMIT);
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

/// The bytes `c` takes in a JSON string as serde_json writes it.
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\u{8}' | '\t' | '\n' | '\u{c}' | '\r' => 2,
        '\0'..='\u{1f}' => 6,
        _ => c.len_utf8(),
    }
}

/// `name` as the summary keeps it: whole when its JSON takes at most `MAX_KEY_BYTES`, else
/// cut on a character boundary and ended with `CUT` (the two within `MAX_KEY_BYTES`). Names
/// alike up to the cut are counted together.
fn capped(name: &str) -> Cow<'_, str> {
    let room = MAX_KEY_BYTES - CUT.len();
    // `end`: the last boundary so far whose prefix fits in `room`.
    let (mut used, mut end) = (0, 0);
    for (at, c) in name.char_indices() {
        if used <= room {
            end = at;
        }
        used += json_len(c);
        if used > MAX_KEY_BYTES {
            return Cow::Owned(format!("{}{CUT}", &name[..end]));
        }
    }
    Cow::Borrowed(name)
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
        bump(&mut self.by_event_type, &capped(&event.event_type));
        bump(&mut self.by_source, &capped(&event.source));
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
        let severity = data.severity().map(capped);
        if let Some(severity) = &severity {
            bump(&mut self.by_severity, severity);
        }
        match event.event_type.as_str() {
            "incident.created" => {
                // Kept capped in `open/<id>` too, so that closing it finds its count.
                let severity = severity.as_deref().unwrap_or("UNKNOWN").to_owned();
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
        // Capped again: an incident opened by an earlier version kept its severity whole.
        let name = capped(severity);
        let severity = if self.open_by_severity.contains_key(name.as_ref()) { name.as_ref() } else { OTHER };
        if let Some(n) = self.open_by_severity.get_mut(severity) {
            *n -= 1;
            if *n == 0 {
                self.open_by_severity.remove(severity);
            }
        }
    }

    /// Cap the names of a summary written by an earlier version (merging the counts of those
    /// the cut makes one), so that it too stays within `SUMMARY_WORST_CASE`.
    fn cap_names(&mut self) {
        let maps = [&mut self.by_event_type, &mut self.by_source, &mut self.by_severity, &mut self.open_by_severity];
        for map in maps {
            if map.keys().all(|name| matches!(capped(name), Cow::Borrowed(_))) {
                continue;
            }
            for (name, n) in std::mem::take(&mut *map) {
                *map.entry(capped(&name).into_owned()).or_default() += n;
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
    COUNTS.with_borrow_mut(|slot| f(slot.get_or_insert_with(load)))
}

fn load() -> Counts {
    let mut counts: Counts = state::get_json(STATE_KEY).unwrap_or_default();
    counts.cap_names();
    counts
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
