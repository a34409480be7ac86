//! Handling a polled batch: skip events already applied, call `handle` with the rest
//! (retrying on a fresh instance), fall back to one event at a time when the batch fails
//! as a whole, dead-letter what still fails, and commit the effects with the new offsets
//! in one store transaction.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::dead_letter::dead_letter;
use super::error::RunnerError;
use super::offsets::TopicPartition;
use super::poll::Polled;
use super::seen::IdSet;
use super::{Mode, Runner};
use crate::log::AppendItem;
use crate::runtime::{CallError, Effects, GuestEnvelope};
use crate::store::{BatchCommit, StoreError};

/// How the attempts at a batch ended, when none succeeded.
enum Attempt {
    /// Every attempt failed; the last error.
    Failed(RunnerError),
    /// A command came in between attempts: the batch is left for after it.
    Interrupted,
}

impl Runner {
    /// Handle one polled batch end to end; Err only when the store could not commit.
    pub(super) fn process(&mut self, mut polled: Vec<Polled>) -> Result<(), StoreError> {
        let mut commit = BatchCommit::default();
        // Indexes into `polled` of the events delivered, and the events themselves.
        let mut deliver: Vec<usize> = Vec::new();
        let mut batch: Vec<GuestEnvelope> = Vec::new();
        let mut batch_ids = IdSet::with_capacity_and_hasher(polled.len(), Default::default());
        for (i, p) in polled.iter_mut().enumerate() {
            if let Ok((id, _)) = &p.event
                && (self.seen.contains(*id) || !batch_ids.insert(*id))
            {
                tracing::debug!(topic = %p.topic, partition = p.record.partition, offset = p.record.offset, event = %uuid::Uuid::from_u128(*id), "skipping an event already applied");
                continue;
            }
            match &mut p.event {
                Err(error) => {
                    let error = error.to_string();
                    tracing::warn!(topic = %p.topic, partition = p.record.partition, offset = p.record.offset, %error, "skipping a record that is not a valid envelope");
                    self.status.note_error(format!("{}: {error}", p.at()));
                    commit.outbox.push(self.dead_letter(p, &error));
                }
                Ok((_, guest)) => {
                    if guest.as_ref().is_some_and(|g| self.version.wants(&g.event_type))
                        && let Some(guest) = guest.take()
                    {
                        deliver.push(i);
                        batch.push(guest);
                    }
                }
            }
        }
        let handled = deliver.len() as u64;
        if !deliver.is_empty() {
            let batch: Arc<[GuestEnvelope]> = batch.into();
            match self.call_with_retries(&batch) {
                Ok(effects) => self.take_effects(&mut commit, effects),
                // Nothing committed: the batch is read again after the command.
                Err(Attempt::Interrupted) => return Ok(()),
                Err(Attempt::Failed(error)) if deliver.len() == 1 => {
                    commit.outbox.push(self.fail_event(&polled[deliver[0]], &error))
                }
                Err(Attempt::Failed(error)) => {
                    tracing::info!(error = %error, events = deliver.len(), "batch failed; handling its events one by one");
                    if self.one_by_one(&polled, &deliver, &batch)?.is_break() {
                        // Commit the dead letters of the records that are not envelopes up
                        // to where the events were taken in (their ids are stable: written
                        // again after the command, the log keeps them once).
                        commit.offsets = self.positions.to_commit();
                        return self.commit(commit);
                    }
                }
            }
        }
        for p in &polled {
            self.positions.advance(&p.topic_partition(), p.record.offset + 1);
        }
        commit.offsets = self.positions.to_commit();
        self.commit(commit)?;
        self.seen.remember(batch_ids);
        self.interruptible = true;
        self.status.update(|s| s.processed += handled);
        tracing::debug!(records = polled.len(), handled, "batch committed");
        Ok(())
    }

    /// After a batch failed as a whole: each event alone, each committed alone (and its
    /// position and id taken in, so that an interruption loses nothing and repeats
    /// nothing). `Break` when a waiting command interrupted it.
    fn one_by_one(
        &mut self,
        polled: &[Polled],
        deliver: &[usize],
        batch: &[GuestEnvelope],
    ) -> Result<ControlFlow<()>, StoreError> {
        for (i, event) in deliver.iter().zip(batch) {
            let p = &polled[*i];
            let mut commit = BatchCommit::default();
            let one: Arc<[GuestEnvelope]> = Arc::new([event.clone()]);
            match self.call_with_retries(&one) {
                Ok(effects) => self.take_effects(&mut commit, effects),
                Err(Attempt::Interrupted) => return Ok(ControlFlow::Break(())),
                Err(Attempt::Failed(error)) => commit.outbox.push(self.fail_event(p, &error)),
            }
            commit.offsets.push((p.topic.clone(), p.record.partition, p.record.offset + 1));
            self.commit(commit)?;
            self.positions.advance(&p.topic_partition(), p.record.offset + 1);
            if let Ok((id, _)) = &p.event {
                self.seen.remember([*id]);
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    /// What a successful call did goes into `commit`, less what this runner must not send:
    /// a shadow keeps only its state; a replay does not broadcast again what was delivered,
    /// nor send HTTP requests again. HTTP requests go to the log (see `delivery`).
    fn take_effects(&mut self, commit: &mut BatchCommit, mut effects: Effects) {
        if self.mode == Mode::Shadow {
            effects.broadcasts.clear();
            effects.publishes.clear();
            effects.http.clear();
        } else if self.lifecycle.replaying().is_some() {
            effects.broadcasts.clear();
            effects.http.clear();
        }
        commit.state_writes = effects.state_writes;
        commit.broadcasts = effects.broadcasts;
        commit.outbox.extend(effects.publishes);
        let (key, host) = (&self.deps.key, self.deps.host_id);
        commit.outbox.extend(effects.http.into_iter().map(|request| {
            crate::delivery::record::item(
                key,
                &crate::delivery::record::Claim { plugin: self.name.to_string(), host, request },
            )
        }));
        self.dead_letter_streak = 0;
    }

    /// Commit state writes, offsets, broadcasts and publishes in one store transaction.
    pub(super) fn commit(&self, mut commit: BatchCommit) -> Result<(), StoreError> {
        if self.mode == Mode::Shadow {
            // Not even dead letters: the live version answers for the stream.
            commit.outbox.clear();
            commit.broadcasts.clear();
        }
        if commit.is_empty() {
            return Ok(());
        }
        // With a shared fan-out log, broadcasts go out through the outbox too.
        let has_outbox = !commit.outbox.is_empty() || !commit.broadcasts.is_empty();
        let hub = self.deps.hub.clone();
        let offsets = (self.mode == Mode::Live).then(|| commit.offsets.clone());
        self.deps.store.commit_batch(&self.namespace, commit, move |fanout| hub.publish(fanout))?;
        for (topic, partition, next) in offsets.iter().flatten() {
            self.log.note_consumer_offset(&self.name, topic, *partition, *next);
        }
        if has_outbox {
            self.deps.outbox.notify_one();
        }
        self.show_offsets();
        Ok(())
    }

    /// Call `handle`, retrying on a fresh instance; the last error if every attempt failed.
    /// An operator's command waiting after a failed attempt interrupts the retries (a query
    /// waits: queries coming often must not keep a failing batch from its dead letter), and
    /// so does a stop, whenever it comes: a stopping plugin dead-letters nothing.
    fn call_with_retries(&mut self, batch: &Arc<[GuestEnvelope]>) -> Result<Effects, Attempt> {
        let attempts = self.version.manifest.limits.retries + 1;
        let mut last = None;
        for attempt in 0..attempts {
            if self.cancel.is_cancelled() || (last.is_some() && self.interrupt.operator_waiting()) {
                tracing::info!("a command is waiting; this batch is read again after it");
                return Err(Attempt::Interrupted);
            }
            match self.call_handle(batch) {
                Ok(effects) => return Ok(effects),
                // Stopping, or a command came: not the plugin's failure; the batch is read
                // again after the command (and that time runs to its end).
                Err(
                    RunnerError::Call(CallError::Cancelled | CallError::Interrupted)
                    | RunnerError::Instantiate(CallError::Cancelled | CallError::Interrupted),
                ) => {
                    // An abandoned call leaves the instance unusable.
                    self.instance = None;
                    self.interruptible = false;
                    return Err(Attempt::Interrupted);
                }
                // Nothing was called: nothing to wait for before trying again.
                Err(error @ RunnerError::Instantiate(_)) => last = Some(error),
                Err(error) => {
                    tracing::warn!(attempt = attempt + 1, of = attempts, events = batch.len(), %error, "batch failed");
                    // Guest memory may be ahead of the committed state: start afresh.
                    self.instance = None;
                    if attempt + 1 < attempts {
                        std::thread::sleep(Duration::from_millis(20 << attempt.min(4)));
                    }
                    last = Some(error);
                }
            }
        }
        if self.cancel.is_cancelled() {
            return Err(Attempt::Interrupted);
        }
        Err(Attempt::Failed(last.expect("at least one attempt")))
    }

    /// One call of `handle`, timed into the status.
    fn call_handle(&mut self, batch: &Arc<[GuestEnvelope]>) -> Result<Effects, RunnerError> {
        let timeout = self.version.timeout;
        let (interrupt, interruptible) = (self.interrupt.clone(), self.interruptible);
        let instance = self.instance()?;
        let started = Instant::now();
        let dropped_before = instance.log_dropped();
        interrupt.arm(Some(interruptible));
        let result = instance.handle(batch, timeout);
        interrupt.arm(None);
        let dropped = instance.log_dropped() - dropped_before;
        self.status.note_call(started.elapsed());
        let limit_hit = matches!(result, Err(CallError::Limit(_)));
        self.status.update(|s| {
            s.log_bytes_dropped += dropped;
            s.limit_hits += u64::from(limit_hit);
        });
        result.map_err(|error| match error {
            CallError::Failed { index: Some(i), message } => {
                let at = batch.get(i as usize).map(|e| (TopicPartition::new(e.topic.clone(), e.partition), e.offset));
                RunnerError::HandleFailed { at, message }
            }
            other => RunnerError::Call(other),
        })
    }

    fn fail_event(&mut self, p: &Polled, error: &RunnerError) -> AppendItem {
        tracing::error!(topic = %p.topic, partition = p.record.partition, offset = p.record.offset, %error, "event sent to the dead-letter topic");
        self.status.note_error(format!("{}: {error}", p.at()));
        self.dead_letter(p, &error.to_string())
    }

    fn dead_letter(&mut self, p: &Polled, error: &str) -> AppendItem {
        self.dead_letter_streak += 1;
        self.status.update(|s| s.dead_letters += 1);
        dead_letter(&self.deps.key, &self.name, p, error)
    }
}
