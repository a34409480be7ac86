//! What a resuming client is told before live records, the same for every transport: where
//! the log is (`welcome`), whether its offset is from another log (`reset`), then the stored
//! records it missed page by page, with a `gap` notice where they are no longer retained.

use serde_json::{Value, json};

use super::Resume;
use crate::store::{FanoutRecord, Store, StoreError};

/// Records read from the store per page while catching a client up.
const PAGE: usize = 1000;

/// Where a client starts.
#[derive(Debug, Clone)]
pub struct Start {
    /// The offset the next broadcast will get.
    pub next: u64,
    pub epoch: u64,
    /// A `reset` notice, when the offset asked for is from another log or past its end
    /// (everything retained is sent then).
    pub reset: Option<Value>,
    /// Catch up after this offset (`Some(None)`: from the oldest retained), or live only.
    pub after: Option<Option<u64>>,
}

impl Start {
    pub fn new(resume: Resume, next: u64, epoch: u64) -> Start {
        let mut reset = None;
        let after = match resume {
            Resume::Live => None,
            Resume::After { offset, epoch: known } if known.is_some_and(|e| e != epoch) || offset >= next => {
                reset = Some(
                    json!({"type": "reset", "reason": "the fan-out log was reset; sending everything retained", "requested": offset, "epoch": epoch}),
                );
                Some(None)
            }
            Resume::After { offset, .. } => Some(Some(offset)),
            Resume::All => Some(None),
        };
        Start { next, epoch, reset, after }
    }

    /// The first frame a client gets.
    pub fn welcome(&self, rooms: &[&String]) -> Value {
        json!({"type": "welcome", "rooms": rooms, "next": self.next, "epoch": self.epoch})
    }
}

/// One thing a catching-up client is sent.
pub enum Item {
    /// A `gap` notice.
    Notice(Value),
    Record(FanoutRecord),
}

/// The stored records after a point, page by page.
#[derive(Clone, Copy)]
pub struct CatchUp {
    /// What the client asked for (reported in a `gap` notice).
    since: Option<u64>,
    /// Everything up to here has been paged out (`None`: nothing yet).
    covered: Option<u64>,
    done: bool,
}

impl CatchUp {
    /// After `since` (`None`: from offset zero).
    pub fn new(since: Option<u64>) -> CatchUp {
        CatchUp { since, covered: since, done: false }
    }

    /// The last offset paged out (or skipped), if any.
    pub fn covered(&self) -> Option<u64> {
        self.covered
    }

    /// The next page of what the client should get, only records of rooms `wanted` keeps;
    /// `None` once caught up with what the store holds.
    /// `next_page` for a client in `rooms`, read on a blocking thread: a store read may wait
    /// on the disk, and an async worker must not.
    pub async fn next_page_blocking(
        &mut self,
        store: &std::sync::Arc<Store>,
        rooms: std::collections::HashSet<String>,
    ) -> Result<Option<Vec<Item>>, StoreError> {
        let (mut pages, store) = (*self, store.clone());
        let (pages, page) = tokio::task::spawn_blocking(move || {
            let page = pages.next_page(&store, |room| rooms.contains(room));
            (pages, page)
        })
        .await
        .expect("reading a catch-up page does not panic");
        *self = pages;
        page
    }

    pub fn next_page(&mut self, store: &Store, wanted: impl Fn(&str) -> bool) -> Result<Option<Vec<Item>>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let mut page = Vec::new();
        let from = self.covered.map_or(0, |c| c.saturating_add(1));
        let (records, oldest) = store.fanout_from(from, PAGE)?;
        let records = if from < oldest {
            page.push(Item::Notice(
                json!({"type": "gap", "reason": "offset no longer retained", "requested": self.since, "oldest": oldest}),
            ));
            self.covered = oldest.checked_sub(1);
            store.fanout_from(oldest, PAGE)?.0
        } else {
            records
        };
        let Some(last) = records.last().map(|r| r.offset) else {
            self.done = true;
            return Ok((!page.is_empty()).then_some(page));
        };
        page.extend(records.into_iter().filter(|r| wanted(&r.room)).map(Item::Record));
        self.covered = Some(last);
        Ok(Some(page))
    }
}
