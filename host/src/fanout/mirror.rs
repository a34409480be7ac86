//! The shared fan-out log (on Iggy): how a broadcast is written to it (an `owlery.broadcast`
//! envelope in topic `owlery-fanout`), and the task that keeps the store's fan-out table a
//! mirror of it and hands new records to the connected clients. Each record is signed with
//! the host key (see `keys`); one without a valid signature (written into Iggy by anything
//! but an Owlery host with the same key) is skipped, so it reaches no client and claims no id.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{FANOUT_TOPIC, Hub};
use crate::envelope::Envelope;
use crate::keys::HostKey;
use crate::log::{AppendItem, EventLog, LogError, Record};
use crate::store::{Broadcast, BroadcastEncoder, FanoutRecord, Store};

/// Event type of the envelopes that carry broadcasts in the shared fan-out topic.
pub const BROADCAST_TYPE: &str = "owlery.broadcast";
/// Records read from the shared fan-out topic per poll.
const PAGE: usize = 1000;
/// How often the mirror looks at the topic's epoch again (it may have been reset).
const RECHECK_EPOCH: Duration = Duration::from_secs(10);

/// How the store writes broadcasts to the shared fan-out topic (see `Store::share_fanout`).
pub fn encoder(key: HostKey) -> BroadcastEncoder {
    Box::new(move |plugin: &str, broadcast: &Broadcast, at_ms: u64| AppendItem {
        topic: FANOUT_TOPIC.to_owned(),
        key: String::new(),
        envelope: envelope(&key, plugin, broadcast, at_ms),
    })
}

/// Metadata key of a fan-out record's signature.
const SIGNATURE: &str = "signature";

/// One fan-out record as its signature covers it: everything a client is shown, and the id.
struct Signed<'a> {
    id: &'a uuid::Uuid,
    room: &'a str,
    plugin: &'a str,
    at_ms: u64,
    payload: &'a str,
    event: &'a str,
}

impl Signed<'_> {
    fn sign(&self, key: &HostKey) -> String {
        key.sign(&self.parts(&self.at_ms.to_be_bytes()))
    }

    fn verify(&self, key: &HostKey, signature: &str) -> bool {
        key.verify(&self.parts(&self.at_ms.to_be_bytes()), signature)
    }

    /// The signed parts. A record without its cause's event type is signed as records were
    /// before it was kept (five parts), so hosts of both versions verify each other's.
    fn parts<'b>(&'b self, at: &'b [u8; 8]) -> Vec<&'b [u8]> {
        let mut parts =
            vec![self.id.as_bytes(), self.room.as_bytes(), self.plugin.as_bytes(), at, self.payload.as_bytes()];
        if !self.event.is_empty() {
            parts.push(self.event.as_bytes());
        }
        parts
    }
}

/// The envelope that carries a broadcast in the shared fan-out topic.
fn envelope(key: &HostKey, plugin: &str, broadcast: &Broadcast, at_ms: u64) -> Envelope {
    let payload: serde_json::Value = serde_json::from_str(&broadcast.payload).unwrap_or(serde_json::Value::Null);
    // Signed as the reader will see it: the payload's JSON text after a round trip.
    let text = payload.to_string();
    let signature =
        Signed { id: &broadcast.id, room: &broadcast.room, plugin, at_ms, payload: &text, event: &broadcast.event }
            .sign(key);
    let mut metadata = serde_json::Map::new();
    metadata.insert(SIGNATURE.into(), signature.into());
    Envelope {
        event_id: broadcast.id,
        event_type: BROADCAST_TYPE.to_owned(),
        timestamp: crate::envelope::now_rfc3339(),
        source: format!("plugin:{plugin}"),
        user_id: None,
        metadata,
        data: serde_json::json!({
            "room": broadcast.room, "plugin": plugin, "atMs": at_ms, "event": broadcast.event, "payload": payload
        }),
        extra: serde_json::Map::new(),
    }
}

/// Keep the store's fan-out table a mirror of the shared fan-out topic, and hand new records
/// to the connected clients. Runs for the life of the host.
pub async fn mirror(log: Arc<dyn EventLog>, store: Arc<Store>, hub: Hub, key: HostKey) {
    let mut changes = log.changes();
    loop {
        meet_the_log(log.as_ref(), &store).await;
        hub.mirroring.store(true, Ordering::Release);
        let checked = tokio::time::Instant::now();
        loop {
            let from = match store.fanout_next() {
                Ok(from) => from,
                Err(error) => {
                    tracing::error!(%error, "reading the fan-out mirror failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            match log.poll(FANOUT_TOPIC, 0, from, PAGE).await {
                Ok(records) if records.is_empty() => {
                    if checked.elapsed() > RECHECK_EPOCH {
                        break;
                    }
                    tokio::select! {
                        _ = changes.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
                Ok(records) => mirror_page(&store, &hub, &key, &records, from).await,
                Err(LogError::NoSuchTopic(_) | LogError::NoSuchPartition { .. }) => break,
                Err(error) => {
                    tracing::debug!(%error, "reading the shared fan-out log failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

/// Wait until the topic's epoch is known; a new one (the topic was deleted and made again,
/// or this host is new to it) starts the mirror afresh, one window back before the
/// retained part so that it knows which ids that part repeats.
async fn meet_the_log(log: &dyn EventLog, store: &Arc<Store>) {
    let mut warned = false;
    loop {
        let epoch = match log.topic_epoch(FANOUT_TOPIC).await {
            Ok(epoch) => epoch,
            Err(error) => {
                if !warned {
                    tracing::warn!(%error, topic = FANOUT_TOPIC, "cannot read the shared fan-out log yet; retrying");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if store.epoch().ok() == Some(epoch) {
            return;
        }
        let Ok(end) = log.high_watermark(FANOUT_TOPIC, 0).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let from = end.saturating_sub(store.fanout_window().saturating_mul(2));
        tracing::info!(epoch, from, end, "mirroring the shared fan-out log");
        let resetting = store.clone();
        let reset = tokio::task::spawn_blocking(move || resetting.reset_fanout(epoch, from)).await;
        match reset.expect("resetting the fan-out mirror does not panic") {
            Ok(()) => return,
            Err(error) => {
                tracing::error!(%error, "resetting the fan-out mirror failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Mirror one page read from the topic and hand what is kept to the clients. Records
/// skipped are logged once per page (a flood of forged records is one line a page).
async fn mirror_page(store: &Arc<Store>, hub: &Hub, key: &HostKey, records: &[Record], from: u64) {
    let next = records.last().map_or(from, |r| r.offset + 1);
    let max_age_ms = store.fanout_max_age_ms();
    let mut decoded = Vec::with_capacity(records.len());
    let mut skipped: Option<(u64, String)> = None;
    let mut skipped_count = 0;
    for record in records {
        match decode(key, record, max_age_ms) {
            Ok(record) => decoded.push(record),
            Err(why) => {
                skipped_count += 1;
                skipped.get_or_insert((record.offset, why));
            }
        }
    }
    if let Some((offset, why)) = skipped {
        tracing::warn!(
            topic = FANOUT_TOPIC,
            count = skipped_count,
            first = offset,
            "skipping records of the fan-out topic; the first: {why}"
        );
    }
    // A write transaction that waits on the commit lock runner threads hold: off the
    // async workers.
    let writing = store.clone();
    let written = tokio::task::spawn_blocking(move || writing.mirror_fanout(decoded, next)).await;
    match written.expect("the fan-out mirror's write does not panic") {
        Ok(kept) => {
            tracing::debug!(read = records.len(), kept = kept.len(), next, "mirrored the shared fan-out log");
            hub.publish(kept)
        }
        Err(error) => {
            tracing::error!(%error, "writing the fan-out mirror failed");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// The fan-out record a record of the shared fan-out topic carries; why not, for anything
/// else, for a record this host's key did not sign, and for one older than `max_age_ms`
/// (0: no limit), so that a signed record copied back into the topic later is not served
/// again once its id is no longer remembered.
fn decode(key: &HostKey, record: &Record, max_age_ms: u64) -> Result<FanoutRecord, String> {
    let envelope = match Envelope::from_bytes(&record.payload) {
        Ok(envelope) if envelope.event_type == BROADCAST_TYPE => envelope,
        Ok(envelope) => return Err(format!("not a broadcast but {:?}", envelope.event_type)),
        Err(error) => return Err(format!("not an envelope: {error}")),
    };
    let text = |key: &str| envelope.data.get(key).and_then(|v| v.as_str()).map(str::to_owned);
    let (Some(room), Some(plugin), Some(payload)) = (text("room"), text("plugin"), envelope.data.get("payload")) else {
        return Err("a broadcast without room, plugin or payload".into());
    };
    let Some(at_ms) = envelope.data.get("atMs").and_then(|v| v.as_u64()) else {
        return Err("a broadcast without atMs".into());
    };
    let payload = payload.to_string();
    let event = text("event").unwrap_or_default();
    let signature = envelope.metadata.get(SIGNATURE).and_then(|v| v.as_str()).unwrap_or_default();
    let signed =
        Signed { id: &envelope.event_id, room: &room, plugin: &plugin, at_ms, payload: &payload, event: &event };
    if !signed.verify(key, signature) {
        return Err("its signature is missing or wrong: not written by an Owlery host with this host's key \
                    (hosts sharing a log need the same cluster_secret)"
            .into());
    }
    if max_age_ms > 0 && crate::envelope::now_millis().saturating_sub(at_ms) > max_age_ms {
        return Err("older than fanout_max_age_secs".into());
    }
    Ok(FanoutRecord { offset: record.offset, id: envelope.event_id, room, plugin, payload, at_ms, event })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(envelope: &Envelope) -> Record {
        Record { partition: 0, offset: 7, payload: envelope.to_bytes().into() }
    }

    #[test]
    fn records_with_and_without_their_causes_type_verify_and_a_changed_type_does_not() {
        let key = HostKey::from_secret(b"mirror test");
        let broadcast = |event: &str| Broadcast {
            id: uuid::Uuid::new_v4(),
            room: "all".into(),
            payload: r#"{"n":1}"#.into(),
            event: event.into(),
        };
        let now = crate::envelope::now_millis();
        // As a host from before the cause's type was kept signs it: five parts.
        let old = envelope(&key, "p", &broadcast(""), now);
        assert_eq!(decode(&key, &record(&old), 0).unwrap().event, "");
        let new = envelope(&key, "p", &broadcast("incident.created"), now);
        let decoded = decode(&key, &record(&new), 0).unwrap();
        assert_eq!((decoded.event.as_str(), decoded.offset, decoded.room.as_str()), ("incident.created", 7, "all"));
        let mut forged = new.clone();
        forged.data["event"] = "alert.raised".into();
        assert!(decode(&key, &record(&forged), 0).unwrap_err().contains("signature"));
        let mut dropped = new;
        dropped.data.as_object_mut().unwrap().remove("event");
        assert!(decode(&key, &record(&dropped), 0).is_err(), "dropping the type is a change too");
    }
}
