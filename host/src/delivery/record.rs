//! A plugin's HTTP request as it travels through the log: an `owlery.http_request` envelope
//! in topic `owlery-http`, keyed by the request's id (so every copy of one request lands in
//! one partition, in an order every host reads alike), naming the plugin and the host that
//! made it, and signed with the host key, so that a record written into the log by anything
//! but an Owlery host with the same key makes no request.

use serde::{Deserialize, Serialize};

use super::HttpRequest;
use crate::envelope::Envelope;
use crate::keys::HostKey;
use crate::log::{AppendItem, Record};

pub use crate::topics::HTTP as TOPIC;

/// Event type of the envelopes that carry requests.
pub const REQUEST_TYPE: &str = "owlery.http_request";
/// Metadata key of a record's signature.
const SIGNATURE: &str = "signature";
/// Label of what is signed, so a request's signature is never another record's.
const LABEL: &[u8] = b"owlery http request v1";

/// What a record of `owlery-http` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub plugin: String,
    /// The host that made this copy (`Store::host_id`): the one that sends it, if its copy
    /// is the first.
    pub host: u64,
    pub request: HttpRequest,
}

/// The outbox entry that carries `claim` to the log.
pub fn item(key: &HostKey, claim: &Claim) -> AppendItem {
    let data = serde_json::to_value(claim).expect("a request serialises");
    // Signed as a reader will see it: the data's JSON text after a round trip.
    let signature = key.sign(&[LABEL, claim.request.id.as_bytes(), data.to_string().as_bytes()]);
    let mut metadata = serde_json::Map::new();
    metadata.insert(SIGNATURE.into(), signature.into());
    let envelope = Envelope {
        event_id: claim.request.id,
        event_type: REQUEST_TYPE.to_owned(),
        timestamp: crate::envelope::now_rfc3339(),
        source: format!("plugin:{}", claim.plugin),
        user_id: None,
        metadata,
        data,
        extra: serde_json::Map::new(),
    };
    AppendItem { topic: TOPIC.to_owned(), key: claim.request.id.to_string(), envelope }
}

/// The claim a record carries; why not, for anything else and for a record this host's key
/// did not sign.
pub fn decode(key: &HostKey, record: &Record) -> Result<Claim, String> {
    let envelope = match Envelope::from_bytes(&record.payload) {
        Ok(envelope) if envelope.event_type == REQUEST_TYPE => envelope,
        Ok(envelope) => return Err(format!("not a request but {:?}", envelope.event_type)),
        Err(error) => return Err(format!("not an envelope: {error}")),
    };
    let signature = envelope.metadata.get(SIGNATURE).and_then(|v| v.as_str()).unwrap_or_default();
    let text = envelope.data.to_string();
    let signed = [LABEL, envelope.event_id.as_bytes(), text.as_bytes()];
    if !key.verify(&signed, signature) {
        return Err("its signature is missing or wrong: not written by an Owlery host with this host's key \
                    (hosts sharing a log need the same cluster_secret)"
            .into());
    }
    let claim: Claim = serde_json::from_value(envelope.data).map_err(|e| format!("not a request: {e}"))?;
    if claim.request.id != envelope.event_id {
        return Err("its id is not the request's".into());
    }
    Ok(claim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Policy;

    fn claim() -> Claim {
        Claim {
            plugin: "alerts".into(),
            host: 7,
            request: HttpRequest {
                id: uuid::Uuid::new_v4(),
                method: "POST".into(),
                url: "http://127.0.0.1:9/hook".into(),
                headers: vec![("content-type".into(), "application/json".into())],
                body: vec![0, 159, 146, 150],
                cause: "e1".into(),
                policy: Policy::default(),
            },
        }
    }

    fn record(item: &AppendItem) -> Record {
        Record { partition: 0, offset: 3, payload: item.envelope.to_bytes().into() }
    }

    #[test]
    fn a_signed_request_reads_back_and_a_changed_one_does_not() {
        let key = HostKey::from_secret(b"record test");
        let claim = claim();
        let item = item(&key, &claim);
        assert_eq!(item.key, claim.request.id.to_string(), "keyed by id: every copy in one partition");
        assert_eq!(decode(&key, &record(&item)).unwrap(), claim, "binary bodies survive");
        let mut forged = item.clone();
        forged.envelope.data["request"]["url"] = "http://evil.example/".into();
        assert!(decode(&key, &record(&forged)).unwrap_err().contains("signature"));
        let other = HostKey::from_secret(b"another cluster");
        assert!(decode(&other, &record(&item)).unwrap_err().contains("signature"));
        let mut moved = item;
        moved.envelope.event_id = uuid::Uuid::new_v4();
        assert!(decode(&key, &record(&moved)).is_err(), "the signature covers the id");
    }
}
