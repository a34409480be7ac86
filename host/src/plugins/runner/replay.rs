//! Replay: where one starts (`ReplayFrom`), the plan that resets a plugin for it (start and
//! target offsets per partition), and the replay under way, which reads each partition up
//! to where it stood when the replay began.

use super::Runner;
use super::error::RunnerError;
use super::log_access::LogAccess;
use super::offsets::{Offsets, TopicPartition};
use super::status::ReplayProgress;
use crate::envelope::Envelope;
use crate::log::LogError;

/// Where a replay starts.
#[derive(Debug, Clone)]
pub enum ReplayFrom {
    /// Offset zero of every partition.
    Start,
    /// These offsets; partitions not named start at zero.
    Offsets(Offsets),
    /// The first event of each partition whose timestamp is at or after this one.
    Timestamp(chrono::DateTime<chrono::Utc>),
}

/// A replay under way: how far the plugin had handled each partition when it began. Its
/// broadcasts for the events below were sent before, so they are not sent again; events it
/// had not handled (it was paused, or behind) are broadcast as usual. Kept in the store, so
/// a restart mid-replay goes on with it.
#[derive(Debug, Clone)]
pub struct Replay {
    target: Offsets,
}

impl Replay {
    pub fn new(target: Offsets) -> Self {
        Replay { target }
    }

    pub fn from_stored(stored: Vec<(String, u32, u64)>) -> Self {
        Replay { target: stored.into_iter().map(|(t, p, n)| (TopicPartition::new(t, p), n)).collect() }
    }

    /// How far a plugin at `positions` with this replay under way had handled each
    /// partition before: the replay's target where it is ahead of the positions.
    pub fn handled(replay: Option<&Replay>, positions: &Offsets) -> Offsets {
        let mut handled = positions.clone();
        for (tp, target) in replay.map(|r| r.target.iter()).into_iter().flatten() {
            if handled.get(tp).is_none_or(|at| at < target) {
                handled.insert(tp.clone(), target);
            }
        }
        handled
    }

    /// Where reading `tp` from `from` stops, so that a batch is wholly replayed events or
    /// wholly new ones; `None` when the partition has nothing left to replay.
    pub fn read_until(&self, tp: &TopicPartition, from: u64) -> Option<u64> {
        self.target.get(tp).filter(|until| *until > from)
    }

    /// Records still to read.
    pub fn remaining(&self, positions: &Offsets) -> u64 {
        self.target.iter().map(|(tp, high)| high.saturating_sub(positions.get(tp).unwrap_or(0))).sum()
    }

    pub fn is_done(&self, positions: &Offsets) -> bool {
        self.target.iter().all(|(tp, high)| positions.get(tp).is_some_and(|p| p >= high))
    }
}

/// What a replay resets the plugin to (`start`), and where it ends (`target`).
pub struct ReplayPlan {
    pub start: Offsets,
    pub target: Offsets,
}

impl ReplayPlan {
    /// The plan for every partition of `topics`, as they are now, for a plugin that had
    /// handled each partition up to `handled`: the replay's target is that, not the log's
    /// end, so that only what it had handled is kept quiet.
    pub fn new(
        log: &LogAccess,
        topics: Vec<String>,
        from: &ReplayFrom,
        handled: &Offsets,
    ) -> Result<ReplayPlan, LogError> {
        let mut start = Offsets::default();
        let mut target = Offsets::default();
        for topic in topics {
            for partition in 0..log.partitions(&topic)? {
                let tp = TopicPartition::new(topic.clone(), partition);
                let high = log.high_watermark(&tp)?;
                let first = match from {
                    ReplayFrom::Start => 0,
                    ReplayFrom::Offsets(offsets) => offsets.get(&tp).unwrap_or(0).min(high),
                    ReplayFrom::Timestamp(at) => first_offset_at(log, &tp, *at, high)?,
                };
                let until = handled.get(&tp).unwrap_or(0).min(high);
                start.insert(tp.clone(), first);
                if until > first {
                    target.insert(tp, until);
                }
            }
        }
        Ok(ReplayPlan { start, target })
    }

    /// Records the replay will read.
    pub fn total(&self) -> u64 {
        // Saturating: a start past the target (a timestamp replay, offsets from the caller)
        // reads nothing rather than wrapping.
        self.target.iter().map(|(tp, high)| high.saturating_sub(self.start.get(tp).unwrap_or(0))).sum()
    }
}

/// The offset of the first event of `tp` stamped at or after `at`; `high` if none is.
fn first_offset_at(
    log: &LogAccess,
    tp: &TopicPartition,
    at: chrono::DateTime<chrono::Utc>,
    high: u64,
) -> Result<u64, LogError> {
    let mut from = 0;
    while from < high {
        let records = log.poll(tp, from, 1000)?;
        let Some(last) = records.last().map(|r| r.offset) else { break };
        for record in &records {
            let when = Envelope::from_bytes(&record.payload)
                .ok()
                .and_then(|e| chrono::DateTime::parse_from_rfc3339(&e.timestamp).ok());
            if when.is_some_and(|w| w >= at) {
                return Ok(record.offset);
            }
        }
        from = last + 1;
    }
    Ok(high)
}

impl Runner {
    /// Drop the plugin's state and offsets and read again from `from`.
    pub(super) fn start_replay(&mut self, from: ReplayFrom) -> Result<(), RunnerError> {
        let topics = self.subscribed_topics()?;
        // A replay asked for during another keeps quiet what was handled before either.
        let handled = Replay::handled(self.lifecycle.any_replay(), &self.positions);
        let plan = ReplayPlan::new(&self.log, topics, &from, &handled)?;
        // The reset, the new offsets and the replay's target in one transaction.
        self.deps.store.start_replay(&self.namespace, &plan.start.to_commit(), &plan.target.to_commit())?;
        let total = plan.total();
        self.positions = plan.start;
        self.seen.forget();
        self.lifecycle.start_replay(Replay::new(plan.target));
        // Fresh memory too: a guest may cache what it read from state.
        self.instance = self.new_instance().ok();
        self.dead_letter_streak = 0;
        tracing::info!(events = total, "replay started");
        self.status.update(|s| {
            s.replay =
                Some(ReplayProgress { done: 0, total, started_at: crate::envelope::now_rfc3339(), finished_at: None });
            s.processed = 0;
        });
        // Nothing to read (a timestamp after everything): over at once.
        self.finish_replay_if_done();
        Ok(())
    }

    fn update_replay_progress(&self) {
        let Some(replay) = self.lifecycle.replaying() else { return };
        let remaining = replay.remaining(&self.positions);
        self.status.update(|s| {
            if let Some(progress) = s.replay.as_mut() {
                progress.done = progress.total.saturating_sub(remaining);
            }
        });
    }

    pub(super) fn finish_replay_if_done(&mut self) {
        let Some(replay) = self.lifecycle.replaying() else { return };
        self.update_replay_progress();
        if replay.is_done(&self.positions) {
            if let Err(error) = self.deps.store.set_replay(&self.namespace, None) {
                // Kept, it is found done again after a restart and dropped then.
                tracing::warn!(%error, "forgetting the finished replay failed");
            }
            self.lifecycle.finish_replay();
            self.status.update(|s| {
                if let Some(progress) = s.replay.as_mut() {
                    progress.finished_at = Some(crate::envelope::now_rfc3339());
                }
            });
            tracing::info!("replay caught up");
            self.publish_state();
        }
    }
}
