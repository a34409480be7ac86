//! The host's own durable store: plugin state, plugin offsets, the fan-out table and the
//! outbox of entries waiting for the log, all in one redb file so that a plugin's batch
//! commits its state writes, new offsets, broadcasts and publishes in one transaction.
//!
//! One file per part: `state` (plugin key spaces and offsets), `fanout` (the table of
//! broadcasts clients resume from, and the mirror of a shared one), `outbox`, `http`
//! (requests taken in for delivery), `commit` (a batch's one transaction).

mod commit;
mod fanout;
mod http;
mod outbox;
mod state;

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

pub use commit::{BatchCommit, Broadcast, BroadcastEncoder};
pub use fanout::FanoutRecord;
pub use http::{Due, Pending, Settle};
pub use outbox::Peeked;

/// (plugin, key) → value
const STATE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("plugin_state");
/// (plugin, topic, partition) → next offset to read
const OFFSETS: TableDefinition<(&str, &str, u32), u64> = TableDefinition::new("plugin_offsets");
/// fan-out offset → FanoutRecord JSON
const FANOUT: TableDefinition<u64, &[u8]> = TableDefinition::new("fanout");
/// outbox sequence → OutboxEntry JSON
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// outbox sequence → {reason, at, entry}: entries that could not be forwarded, kept
const OUTBOX_ASIDE: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox_aside");
/// outbox sequence → OutboxEntry JSON: the last entries a remote log acknowledged, sent
/// again after a lost connection (see `EventLog::losses`)
const OUTBOX_RECENT: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox_recent");
/// counters: "fanout_next", "outbox_next", "http_seen_next", "epoch" (random, fixed when the
/// store is made; with a shared fan-out log, that log's) and "host_id" (random, fixed)
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// plugin → the replay under way: JSON `[[topic, partition, target], ...]`, the offsets up
/// to which it had handled the stream when the replay began (its broadcasts below them are
/// not sent again)
const REPLAYS: TableDefinition<&str, &[u8]> = TableDefinition::new("replays");
/// plugin → the version a promotion committed (see `Store::promote_namespace`), until its
/// files are in the plugins directory
const PROMOTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("promotions");
/// broadcast id → fan-out offset, for the records mirrored from a shared fan-out log
const FANOUT_IDS: TableDefinition<u128, u64> = TableDefinition::new("fanout_ids");
/// fan-out offset → broadcast id, to forget the oldest ids
const FANOUT_ID_AT: TableDefinition<u64, u128> = TableDefinition::new("fanout_id_at");

/// What can go wrong in the store; every redb error converts with `?`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: creating {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("store: {0}")]
    Db(#[from] redb::Error),
    #[error("store: a stored record cannot be read back: {0}")]
    Corrupt(#[from] serde_json::Error),
    /// The commit that took a plugin's batch (another plugin's) ended before writing it.
    #[error("store: the commit that took this batch ended (panicked) before writing it")]
    Unanswered,
}

/// Every redb error type converts (through `redb::Error`), so `?` works on each call.
macro_rules! from_redb {
    ($($error:ident),*) => {$(
        impl From<redb::$error> for StoreError {
            fn from(error: redb::$error) -> StoreError {
                StoreError::Db(error.into())
            }
        }
    )*};
}
from_redb!(DatabaseError, TransactionError, TableError, StorageError, CommitError, SetDurabilityError);

pub struct Store {
    db: Database,
    /// Held from a batch's commit until its fan-out records are handed on, so that they
    /// reach the hub in offset order.
    commit_order: std::sync::Mutex<()>,
    /// Fan-out records kept; older ones are trimmed (a resuming client is told).
    fanout_retention: u64,
    /// Fan-out records older than this are trimmed too (0: no age limit).
    fanout_max_age_ms: u64,
    /// With a shared fan-out log (see `share_fanout`): how a broadcast becomes the outbox
    /// entry that carries it there; the fan-out table then mirrors that log.
    shared: Option<BroadcastEncoder>,
    /// Outbox entries removed by commits not synced to disk yet (see `outbox_remove`):
    /// only added to, or taken whole by a durable commit (and given back if it fails).
    unsynced_removals: std::sync::atomic::AtomicU64,
    /// Plugin batches waiting to be committed together (see `commit_batch`).
    group: std::sync::Mutex<commit::Group>,
}

impl Store {
    /// `fanout_retention` broadcasts are kept for resuming clients, none older than
    /// `fanout_max_age` (zero: no age limit).
    pub fn open(dir: &Path, fanout_retention: u64, fanout_max_age: std::time::Duration) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Create { path: dir.to_owned(), source })?;
        let db = Database::create(dir.join("store.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(STATE)?;
        txn.open_table(OFFSETS)?;
        txn.open_table(FANOUT)?;
        txn.open_table(OUTBOX)?;
        txn.open_table(OUTBOX_ASIDE)?;
        txn.open_table(OUTBOX_RECENT)?;
        txn.open_table(REPLAYS)?;
        txn.open_table(PROMOTIONS)?;
        txn.open_table(FANOUT_IDS)?;
        txn.open_table(FANOUT_ID_AT)?;
        Store::open_http_tables(&txn)?;
        {
            let mut meta = txn.open_table(META)?;
            if meta.get("epoch")?.is_none() {
                // Tells a resuming client that the fan-out log it knew is not this one.
                let epoch = (uuid::Uuid::new_v4().as_u128() as u64) >> 11;
                meta.insert("epoch", epoch)?;
            }
            if meta.get("host_id")?.is_none() {
                // Tells this host's copies of HTTP requests from another host's.
                meta.insert("host_id", (uuid::Uuid::new_v4().as_u128() as u64) | 1)?;
            }
        }
        txn.commit()?;
        Ok(Store {
            db,
            commit_order: std::sync::Mutex::new(()),
            fanout_retention: fanout_retention.max(1),
            fanout_max_age_ms: fanout_max_age.as_millis() as u64,
            shared: None,
            unsynced_removals: std::sync::atomic::AtomicU64::new(0),
            group: Default::default(),
        })
    }

    /// Broadcasts go to the log (as the outbox entries `encode` makes, committed with the
    /// batch) instead of straight into the fan-out table, which then mirrors that log (see
    /// `mirror_fanout`): every host on the same log serves the same fan-out offsets.
    pub fn share_fanout(&mut self, encode: BroadcastEncoder) {
        self.shared = Some(encode);
    }

    /// A counter of the `META` table (0 when never set).
    fn meta(table: &impl ReadableTable<&'static str, u64>, key: &str) -> Result<u64, StoreError> {
        Ok(table.get(key)?.map_or(0, |v| v.value()))
    }

    fn lock_order(&self) -> std::sync::MutexGuard<'_, ()> {
        self.commit_order.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        Ok(self.db.begin_read()?)
    }
}
