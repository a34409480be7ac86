//! Reading a batch: up to `max_batch` records across the subscribed partitions, each
//! decoded into what the plugin gets (or kept with the reason it is not an event).

use super::Runner;
use super::log_access::LogAccess;
use super::offsets::{Offsets, TopicPartition};
use crate::log::{LogError, Record};
use crate::runtime::GuestEnvelope;

/// A stored record that is not a valid envelope.
#[derive(Debug, thiserror::Error)]
#[error("not a valid envelope: {0}")]
pub struct NotAnEnvelope(String);

/// One record of a polled batch, decoded (or not).
pub struct Polled {
    pub topic: String,
    pub record: Record,
    /// The event id and what the plugin gets. The guest envelope is taken out when the
    /// event is delivered.
    pub event: Result<(u128, Option<GuestEnvelope>), NotAnEnvelope>,
}

impl Polled {
    fn new(topic: &str, record: Record) -> Self {
        let event = guest_from_record(topic, &record).map(|(id, guest)| (id, Some(guest)));
        Polled { topic: topic.to_owned(), record, event }
    }

    /// Where it stands: `topic/partition/offset`.
    pub fn at(&self) -> String {
        format!("{}/{}/{}", self.topic, self.record.partition, self.record.offset)
    }

    pub fn topic_partition(&self) -> TopicPartition {
        TopicPartition::new(self.topic.clone(), self.record.partition)
    }
}

/// What a plugin gets for a stored record, and the event's id. Reads the stored JSON once,
/// keeping `data` and `metadata` as their text.
pub fn guest_from_record(topic: &str, record: &Record) -> Result<(u128, GuestEnvelope), NotAnEnvelope> {
    let (id, e) = crate::envelope::StoredEnvelope::parse(&record.payload).map_err(NotAnEnvelope)?;
    let guest = GuestEnvelope {
        event_id: id.to_string(),
        event_type: e.event_type.into_owned(),
        timestamp: e.timestamp.into_owned(),
        source: e.source.into_owned(),
        user_id: e.user_id.map(std::borrow::Cow::into_owned),
        metadata: e.metadata.map_or_else(|| "{}".to_owned(), |m| m.get().to_owned()),
        data: e.data.map_or_else(|| "null".to_owned(), |d| d.get().to_owned()),
        topic: topic.to_owned(),
        partition: record.partition,
        offset: record.offset,
    };
    Ok((id.as_u128(), guest))
}

/// What one read asks for: each partition still to read from, with `(from, until)`, and
/// the batch's size. A read ahead stands in for a read now only when both have the same
/// plan. That is sound because a read returns, for each partition, the records from its
/// `from` on with none skipped (it may return fewer than another read would: the log grows,
/// a remote log answers a page), and because a runner only ever waits for the log after an
/// empty read made afresh (see `poll_batch`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ReadPlan {
    open: Vec<(TopicPartition, u64, u64)>,
    max: usize,
}

type ReadResult = Result<Vec<Polled>, LogError>;

/// A plugin catching up spends its own thread on `handle` and its commit; a second thread,
/// its reader, reads and decodes the batch after the one being handled meanwhile.
#[derive(Default)]
pub(super) struct ReadAhead {
    /// To the reader: what to read, and where to answer. Started at the first read ahead,
    /// on a thread of its own rather than tokio's blocking pool, where a read could queue
    /// behind blocking work that itself waits on this runner (an upload waiting for its
    /// swap). It ends when this is dropped, after the read it is on.
    reader: Option<std::sync::mpsc::Sender<(ReadPlan, std::sync::mpsc::SyncSender<ReadResult>)>>,
    /// The read under way, and the plan it is for.
    pending: Option<(ReadPlan, std::sync::mpsc::Receiver<ReadResult>)>,
}

impl ReadAhead {
    /// Ask the reader (started if need be) to read `plan`; nothing is read ahead if no
    /// thread could be had.
    fn start(&mut self, plugin: &str, log: &LogAccess, plan: ReadPlan) {
        if self.reader.is_none() {
            let (requests, jobs) = std::sync::mpsc::channel::<(ReadPlan, std::sync::mpsc::SyncSender<ReadResult>)>();
            let log = log.clone();
            let spawned = std::thread::Builder::new().name(format!("reader-{plugin}")).spawn(move || {
                for (plan, answer) in jobs {
                    let _ = answer.send(read(&log, plan));
                }
            });
            if let Err(error) = spawned {
                tracing::warn!(%error, "no thread to read ahead with; reading batch by batch");
                return;
            }
            self.reader = Some(requests);
        }
        let (answer, result) = std::sync::mpsc::sync_channel(1);
        if self.reader.as_ref().is_some_and(|reader| reader.send((plan.clone(), answer)).is_ok()) {
            self.pending = Some((plan, result));
        }
    }
}

impl Runner {
    /// Read up to `max_batch` records across the subscribed partitions: what was read ahead
    /// for exactly these positions if there is such a read and it found records, else a
    /// read now.
    pub(super) fn poll_batch(&mut self) -> Result<Vec<Polled>, LogError> {
        self.seen.prime(&self.log, &self.positions)?;
        let plan = self.plan(&self.positions);
        if let Some((ahead, result)) = self.ahead.pending.take() {
            // An empty or failed read ahead is not trusted: it was made before this turn
            // marked the log's changes seen, so what came since might be missing from it,
            // and an empty read is what sends the runner to wait for the log.
            let used = (ahead == plan)
                .then(|| result.recv())
                .and_then(|answer| answer.ok()?.ok())
                .filter(|polled| !polled.is_empty());
            self.count_read_ahead(used.is_some());
            if let Some(polled) = used {
                return Ok(polled);
            }
        }
        read(&self.log, plan)
    }

    /// Start reading the batch that follows `polled`, when the plugin is catching up (the
    /// batch is full) and live: a shadow's reads are bounded by how far the live version
    /// has come, which a replay of it can move back. Nothing is pending here: `poll_batch`
    /// took it.
    pub(super) fn read_ahead(&mut self, polled: &[Polled]) {
        let max = self.version.manifest.limits.max_batch;
        if self.mode != super::Mode::Live || polled.len() < max {
            return;
        }
        let mut next = self.positions.clone();
        for p in polled {
            next.advance(&p.topic_partition(), p.record.offset + 1);
        }
        let plan = self.plan(&next);
        if plan.open.is_empty() {
            return;
        }
        self.ahead.start(&self.name, &self.log, plan);
    }

    /// Forget what was read ahead: it is for the positions before a command.
    pub(super) fn drop_read_ahead(&mut self) {
        if self.ahead.pending.take().is_some() {
            self.count_read_ahead(false);
        }
    }

    fn count_read_ahead(&self, used: bool) {
        let outcome = if used { "used" } else { "dropped" };
        crate::metrics::metrics().reads_ahead.with_label_values(&[&*self.name, outcome]).inc();
    }

    /// What to read next from `positions`.
    fn plan(&self, positions: &Offsets) -> ReadPlan {
        let max = self.version.manifest.limits.max_batch;
        // While replaying, read only up to where the replay began.
        let replay = self.lifecycle.replaying();
        // A shadow reads only what the live version has handled: promoted, it must not be
        // ahead of live, whose broadcasts and publishes for the events between would never
        // be made (a shadow's are dropped).
        let live = match self.mode {
            super::Mode::Shadow => Some(self.deps.store.offsets(&self.name).unwrap_or_default()),
            super::Mode::Live => None,
        };
        let open = positions
            .iter()
            .filter_map(|(tp, from)| {
                let mut until = match replay {
                    Some(replay) => replay.read_until(tp, from)?,
                    None => u64::MAX,
                };
                if let Some(live) = &live {
                    until = until.min(live.get(&(tp.topic.clone(), tp.partition)).copied().unwrap_or(0));
                }
                (until > from).then(|| (tp.clone(), from, until))
            })
            .collect();
        ReadPlan { open, max }
    }
}

/// Read what `plan` asks for, decoded. All partitions at once (one round trip, not one per
/// partition, on a remote log), a fair share each; then the partitions that filled their
/// share split what is left.
fn read(log: &LogAccess, plan: ReadPlan) -> Result<Vec<Polled>, LogError> {
    let ReadPlan { mut open, max } = plan;
    let mut polled: Vec<Polled> = Vec::new();
    for _round in 0..2 {
        let budget = max.saturating_sub(polled.len());
        if open.is_empty() || budget == 0 {
            break;
        }
        let share = (budget / open.len()).max(1);
        let wants: Vec<usize> = open
            .iter()
            .map(|(_, from, until)| share.min(usize::try_from(until - from).unwrap_or(usize::MAX)))
            .collect();
        let reads: Vec<_> = open.iter().zip(&wants).map(|((tp, from, _), want)| (tp, *from, *want)).collect();
        let results = log.poll_many(&reads);
        let mut still_open = Vec::new();
        for (((tp, from, until), want), records) in open.into_iter().zip(wants).zip(results) {
            let records = records?;
            let full = records.len() == want;
            let next = records.last().map_or(from, |r| r.offset + 1);
            polled.extend(records.into_iter().map(|record| Polled::new(&tp.topic, record)));
            if full && next < until {
                still_open.push((tp, next, until));
            }
        }
        open = still_open;
    }
    Ok(polled)
}
