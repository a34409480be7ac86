//! The store's side of HTTP delivery (see `delivery`): which request ids this host has seen
//! in `owlery-http` and how far it has read each partition, the requests this host is to
//! send, and per plugin what became of them. Taking a request in, and settling one, are one
//! transaction each, with the read position and the counts, so a crash loses none and
//! counts none twice.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{META, Store, StoreError};
use crate::delivery::HttpCounts;
use crate::delivery::record::Claim;
use crate::log::AppendItem;

/// request id → sequence number: ids seen in `owlery-http` (the first copy counts)
const SEEN: TableDefinition<u128, u64> = TableDefinition::new("http_seen");
/// sequence number → request id, to forget the oldest ids
const SEEN_AT: TableDefinition<u64, u128> = TableDefinition::new("http_seen_at");
/// partition of `owlery-http` → next offset to read
const READ: TableDefinition<u32, u64> = TableDefinition::new("http_read");
/// request id → Pending JSON: requests this host is to send
const PENDING: TableDefinition<u128, &[u8]> = TableDefinition::new("http_pending");
/// plugin → HttpCounts JSON
const COUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("http_counts");

/// Request ids remembered; a copy of a request later than this many others is not known
/// as a copy (the log's own deduplication catches most copies long before).
const SEEN_KEEP: u64 = 1_000_000;

/// A request this host is to send, and how its attempts went so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub plugin: String,
    pub request: crate::delivery::HttpRequest,
    /// Attempts made.
    pub attempts: u32,
    /// When the next attempt is due (ms since the epoch).
    pub due_ms: u64,
    pub last_error: Option<String>,
}

/// What the worker needs to schedule a pending request without holding its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub id: uuid::Uuid,
    pub due_ms: u64,
    /// scheme://host:port
    pub destination: String,
}

impl Due {
    fn of(pending: &Pending) -> Due {
        let destination = reqwest::Url::parse(&pending.request.url)
            .map(|url| crate::delivery::allow::destination(&url))
            .unwrap_or_default();
        Due { id: pending.request.id, due_ms: pending.due_ms, destination }
    }
}

/// How an attempt ended, as the store records it.
#[derive(Debug)]
pub enum Settle {
    Delivered,
    /// Try again at `due_ms`.
    Retry {
        due_ms: u64,
        error: String,
    },
    /// Given up: the dead letter to write.
    Failed {
        error: String,
        dead_letter: Box<AppendItem>,
    },
}

type Counts<'t> = redb::Table<'t, &'static str, &'static [u8]>;

fn counts_of(table: &Counts<'_>, plugin: &str) -> Result<HttpCounts, StoreError> {
    Ok(match table.get(plugin)? {
        Some(bytes) => serde_json::from_slice(bytes.value())?,
        None => HttpCounts::default(),
    })
}

fn update_counts(table: &mut Counts<'_>, plugin: &str, change: impl FnOnce(&mut HttpCounts)) -> Result<(), StoreError> {
    let mut counts = counts_of(table, plugin)?;
    change(&mut counts);
    table.insert(plugin, serde_json::to_vec(&counts)?.as_slice())?;
    Ok(())
}

impl Store {
    pub(super) fn open_http_tables(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
        txn.open_table(SEEN)?;
        txn.open_table(SEEN_AT)?;
        txn.open_table(READ)?;
        txn.open_table(PENDING)?;
        txn.open_table(COUNTS)?;
        Ok(())
    }

    /// Where this host reads partition `partition` of `owlery-http` next.
    pub fn http_read_next(&self, partition: u32) -> Result<u64, StoreError> {
        let table = self.read()?.open_table(READ)?;
        Ok(table.get(partition)?.map_or(0, |v| v.value()))
    }

    /// Take in `claims` read from `partition` up to `next`: a request id seen before is a
    /// copy and skipped; a first copy made by host `me` becomes pending, unless its plugin
    /// already has its policy's `max_pending`, when it becomes a dead letter (`dead_letter`
    /// makes it). The new pending requests, to schedule.
    pub fn http_take_in(
        &self,
        partition: u32,
        next: u64,
        claims: Vec<Claim>,
        me: u64,
        dead_letter: impl Fn(&Claim, &str) -> AppendItem,
    ) -> Result<Vec<Due>, StoreError> {
        let _order = self.lock_order();
        let txn = self.db.begin_write()?;
        let mut due = Vec::new();
        {
            let mut seen = txn.open_table(SEEN)?;
            let mut seen_at = txn.open_table(SEEN_AT)?;
            let mut pending = txn.open_table(PENDING)?;
            let mut counts = txn.open_table(COUNTS)?;
            let mut meta = txn.open_table(META)?;
            let mut seq = Store::meta(&meta, "http_seen_next")?;
            let mut dead = Vec::new();
            for claim in claims {
                let id = claim.request.id.as_u128();
                if seen.get(id)?.is_some() {
                    continue;
                }
                seen.insert(id, seq)?;
                seen_at.insert(seq, id)?;
                seq += 1;
                if claim.host != me {
                    continue;
                }
                let full = counts_of(&counts, &claim.plugin)?.pending >= claim.request.policy.max_pending;
                if full {
                    let error = format!(
                        "more than {} requests pending (delivery.max_pending)",
                        claim.request.policy.max_pending
                    );
                    dead.push(dead_letter(&claim, &error));
                    update_counts(&mut counts, &claim.plugin, |c| {
                        c.failed += 1;
                        c.last_error = Some(error);
                    })?;
                    continue;
                }
                let entry = Pending {
                    plugin: claim.plugin,
                    request: claim.request,
                    attempts: 0,
                    due_ms: crate::envelope::now_millis(),
                    last_error: None,
                };
                pending.insert(id, serde_json::to_vec(&entry)?.as_slice())?;
                update_counts(&mut counts, &entry.plugin, |c| c.pending += 1)?;
                due.push(Due::of(&entry));
            }
            // Forget the oldest ids past the window.
            while seen.len()? > SEEN_KEEP {
                let Some((at, id)) = seen_at.pop_first()? else { break };
                let _ = at;
                seen.remove(id.value())?;
            }
            meta.insert("http_seen_next", seq)?;
            txn.open_table(READ)?.insert(partition, next)?;
            if !dead.is_empty() {
                super::outbox::push(&txn, &mut meta, &mut dead.iter())?;
            }
        }
        txn.commit()?;
        Ok(due)
    }

    /// Meet `owlery-http` as the log has it now, of epoch `epoch` (`EventLog::topic_epoch`):
    /// a topic made again since the last meeting (a new epoch) is read from 0 on every
    /// partition, since offsets into the old one say nothing about the new one, even where
    /// it has already grown past them. Ids seen before are still known as copies. `true`
    /// when the read positions were reset.
    pub fn http_meet_epoch(&self, epoch: u64) -> Result<bool, StoreError> {
        let _order = self.lock_order();
        let txn = self.db.begin_write()?;
        let reset;
        {
            let mut meta = txn.open_table(META)?;
            // Stored one up, so that 0 is "never met" (an upgraded store keeps its positions).
            let stored = Store::meta(&meta, "http_epoch")?;
            reset = stored != 0 && stored != epoch.wrapping_add(1);
            if reset {
                let mut read = txn.open_table(READ)?;
                read.retain(|_, _| false)?;
            }
            meta.insert("http_epoch", epoch.wrapping_add(1))?;
        }
        txn.commit()?;
        Ok(reset)
    }

    /// Every request this host is to send (at start).
    pub fn http_pending_due(&self) -> Result<Vec<Due>, StoreError> {
        let table = self.read()?.open_table(PENDING)?;
        let mut due = Vec::new();
        for entry in table.iter()? {
            let (_, bytes) = entry?;
            due.push(Due::of(&serde_json::from_slice::<Pending>(bytes.value())?));
        }
        Ok(due)
    }

    pub fn http_pending(&self, id: uuid::Uuid) -> Result<Option<Pending>, StoreError> {
        let table = self.read()?.open_table(PENDING)?;
        Ok(match table.get(id.as_u128())? {
            Some(bytes) => Some(serde_json::from_slice(bytes.value())?),
            None => None,
        })
    }

    /// Record how an attempt at request `id` ended: delivered (gone), to try again (its
    /// attempts counted), or given up (gone, its dead letter in the outbox). `true` when
    /// the outbox got an entry.
    pub fn http_settle(&self, id: uuid::Uuid, settle: Settle) -> Result<bool, StoreError> {
        let _order = self.lock_order();
        let txn = self.db.begin_write()?;
        let mut wrote_outbox = false;
        {
            let mut pending = txn.open_table(PENDING)?;
            let Some(mut entry) =
                pending.get(id.as_u128())?.map(|b| serde_json::from_slice::<Pending>(b.value())).transpose()?
            else {
                return Ok(false);
            };
            let mut counts = txn.open_table(COUNTS)?;
            entry.attempts += 1;
            match settle {
                Settle::Delivered => {
                    pending.remove(id.as_u128())?;
                    update_counts(&mut counts, &entry.plugin, |c| {
                        c.pending = c.pending.saturating_sub(1);
                        c.delivered += 1;
                    })?;
                }
                Settle::Retry { due_ms, error } => {
                    entry.due_ms = due_ms;
                    update_counts(&mut counts, &entry.plugin, |c| c.last_error = Some(error.clone()))?;
                    entry.last_error = Some(error);
                    pending.insert(id.as_u128(), serde_json::to_vec(&entry)?.as_slice())?;
                }
                Settle::Failed { error, dead_letter } => {
                    pending.remove(id.as_u128())?;
                    update_counts(&mut counts, &entry.plugin, |c| {
                        c.pending = c.pending.saturating_sub(1);
                        c.failed += 1;
                        c.last_error = Some(error);
                    })?;
                    let mut meta = txn.open_table(META)?;
                    super::outbox::push(&txn, &mut meta, &mut std::iter::once(dead_letter.as_ref()))?;
                    wrote_outbox = true;
                }
            }
        }
        txn.commit()?;
        Ok(wrote_outbox)
    }

    /// What became of `plugin`'s requests.
    pub fn http_counts(&self, plugin: &str) -> Result<HttpCounts, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(COUNTS)?;
        Ok(match table.get(plugin)? {
            Some(bytes) => serde_json::from_slice(bytes.value())?,
            None => HttpCounts::default(),
        })
    }

    /// A random number fixed when the store was made: which host a request's copy is from.
    pub fn host_id(&self) -> Result<u64, StoreError> {
        let table = self.read()?.open_table(META)?;
        Store::meta(&table, "host_id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{HttpRequest, Policy};

    fn claim(id: u128, host: u64, max_pending: u64) -> Claim {
        Claim {
            plugin: "alerts".into(),
            host,
            request: HttpRequest {
                id: uuid::Uuid::from_u128(id),
                method: "POST".into(),
                url: "http://127.0.0.1:9/hook".into(),
                headers: Vec::new(),
                body: b"{}".to_vec(),
                cause: "e".into(),
                policy: Policy { max_pending, ..Policy::default() },
            },
        }
    }

    fn dead(claim: &Claim, error: &str) -> AppendItem {
        AppendItem {
            topic: "dead-letters".into(),
            key: String::new(),
            envelope: crate::envelope::Envelope {
                event_id: claim.request.id,
                event_type: "owlery.delivery_failed".into(),
                timestamp: "2026-01-01T00:00:00Z".into(),
                source: "t".into(),
                user_id: None,
                metadata: serde_json::Map::new(),
                data: serde_json::json!({"error": error}),
                extra: serde_json::Map::new(),
            },
        }
    }

    #[test]
    fn the_first_copy_counts_and_only_its_host_sends_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 10, std::time::Duration::ZERO).unwrap();
        let me = store.host_id().unwrap();
        assert_ne!(me, 0);
        // Another host's copy of 1 comes first; then this host's copies of 1 and 2, and 2 again.
        let page = vec![claim(1, me + 1, 10), claim(1, me, 10), claim(2, me, 10), claim(2, me, 10)];
        let due = store.http_take_in(0, 4, page, me, dead).unwrap();
        assert_eq!(due.iter().map(|d| d.id.as_u128()).collect::<Vec<_>>(), [2], "1 is the other host's to send");
        assert_eq!(due[0].destination, "http://127.0.0.1:9");
        assert_eq!(store.http_read_next(0).unwrap(), 4);
        // Read again after a crash before the next page: nothing twice.
        assert!(store.http_take_in(0, 4, vec![claim(2, me, 10)], me, dead).unwrap().is_empty());
        assert_eq!(store.http_counts("alerts").unwrap().pending, 1);

        assert!(!store.http_settle(due[0].id, Settle::Retry { due_ms: 5, error: "down".into() }).unwrap());
        let pending = store.http_pending(due[0].id).unwrap().unwrap();
        assert_eq!((pending.attempts, pending.due_ms), (1, 5));
        assert!(!store.http_settle(due[0].id, Settle::Delivered).unwrap());
        let counts = store.http_counts("alerts").unwrap();
        assert_eq!((counts.pending, counts.delivered, counts.last_error.as_deref()), (0, 1, Some("down")));
        assert!(store.http_pending(due[0].id).unwrap().is_none());
        assert!(!store.http_settle(due[0].id, Settle::Delivered).unwrap(), "settled once");
        assert_eq!(store.http_counts("alerts").unwrap().delivered, 1);
    }

    #[test]
    fn a_topic_made_again_is_read_from_0_and_its_old_ids_stay_copies() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 10, std::time::Duration::ZERO).unwrap();
        let me = store.host_id().unwrap();
        assert!(!store.http_meet_epoch(7).unwrap(), "first meeting: nothing to reset");
        store.http_take_in(0, 40, vec![claim(1, me, 10)], me, dead).unwrap();
        store.http_take_in(1, 9, Vec::new(), me, dead).unwrap();
        assert!(!store.http_meet_epoch(7).unwrap(), "the same topic");
        assert_eq!(store.http_read_next(0).unwrap(), 40);
        assert!(store.http_meet_epoch(8).unwrap(), "made again");
        assert_eq!((store.http_read_next(0).unwrap(), store.http_read_next(1).unwrap()), (0, 0));
        let due = store.http_take_in(0, 2, vec![claim(1, me, 10), claim(2, me, 10)], me, dead).unwrap();
        assert_eq!(due.iter().map(|d| d.id.as_u128()).collect::<Vec<_>>(), [2], "1 was taken in already");
    }

    #[test]
    fn past_max_pending_a_request_is_a_dead_letter_at_once_and_a_failure_writes_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 10, std::time::Duration::ZERO).unwrap();
        let me = store.host_id().unwrap();
        let due = store.http_take_in(0, 3, vec![claim(1, me, 2), claim(2, me, 2), claim(3, me, 2)], me, dead).unwrap();
        assert_eq!(due.len(), 2);
        let counts = store.http_counts("alerts").unwrap();
        assert_eq!((counts.pending, counts.failed), (2, 1));
        assert!(counts.last_error.unwrap().contains("max_pending"));
        assert_eq!(store.outbox_counts().unwrap().0, 1, "its dead letter is in the outbox");
        let failed = Settle::Failed { error: "404".into(), dead_letter: Box::new(dead(&claim(1, me, 2), "404")) };
        assert!(store.http_settle(due[0].id, failed).unwrap());
        assert_eq!(store.outbox_counts().unwrap().0, 2);
        assert_eq!(store.http_pending_due().unwrap().len(), 1, "one still pending, found at start");
        assert_eq!(store.http_counts("alerts").unwrap().failed, 2);
    }
}
