//! Each host reads `owlery-http` and takes in the requests that are its to send: the first
//! copy of each request id in the log, when this host wrote that copy. Every host reads the
//! same partitions in the same order, so they agree on which copy is first without talking
//! to each other, and a request made by two hosts running one plugin is sent by one.
//! What is taken in, and how far the topic was read, commit in one transaction.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use super::record::{self, TOPIC};
use crate::keys::HostKey;
use crate::log::{EventLog, LogError, Record};
use crate::store::{Due, Store};

/// Records read per poll.
const PAGE: usize = 500;
/// How often the topic is checked for having been made again (a new epoch, or a partition
/// ending before where this host stands), which starts it afresh from 0.
const RECHECK: Duration = Duration::from_secs(10);

/// Read `owlery-http` for the life of the host, handing what this host takes in to the
/// worker through `due`.
pub async fn claim(log: Arc<dyn EventLog>, store: Arc<Store>, key: HostKey, due: UnboundedSender<Due>) {
    let me = match store.host_id() {
        Ok(me) => me,
        Err(error) => {
            tracing::error!(%error, "reading the host id failed; no HTTP requests will be sent");
            return;
        }
    };
    let mut changes = log.changes();
    let mut checked: Option<tokio::time::Instant> = None;
    let mut failing = Failing::default();
    loop {
        let partitions = match log.partitions(TOPIC).await {
            Ok(n) => n,
            Err(error) => {
                failing.note(&error.to_string(), None);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let recheck = checked.is_none_or(|at| at.elapsed() > RECHECK);
        if recheck {
            match meet_epoch(log.as_ref(), &store).await {
                Ok(()) => checked = Some(tokio::time::Instant::now()),
                Err(error) => {
                    // Not read past an unknown epoch: it could be a new topic's.
                    failing.note(&error, None);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        let mut read_any = false;
        for partition in 0..partitions {
            match read_partition(log.as_ref(), &store, &key, me, partition, recheck).await {
                Ok(Some(taken)) => {
                    read_any = true;
                    failing.cleared();
                    for one in taken {
                        let _ = due.send(one);
                    }
                }
                Ok(None) => failing.cleared(),
                Err(error) => {
                    failing.note(&error, Some(partition));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        if !read_any {
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }
}

/// Reading failures are logged once at `warn` when they start (requests wait while the
/// topic cannot be read), then at `debug` until a read succeeds again.
#[derive(Default)]
struct Failing {
    since: Option<tokio::time::Instant>,
}

impl Failing {
    fn note(&mut self, error: &str, partition: Option<u32>) {
        if self.since.is_none() {
            tracing::warn!(%error, topic = TOPIC, ?partition, "reading the requests topic failed; HTTP requests wait until it can be read; retrying");
            self.since = Some(tokio::time::Instant::now());
        } else {
            tracing::debug!(%error, topic = TOPIC, ?partition, "reading the requests topic failed; retrying");
        }
    }

    fn cleared(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                after_ms = since.elapsed().as_millis() as u64,
                topic = TOPIC,
                "reading the requests topic again"
            );
        }
    }
}

/// Compare the topic's epoch with the one this host last read; a new one (the topic was
/// deleted and made again) starts every partition from 0.
async fn meet_epoch(log: &dyn EventLog, store: &Arc<Store>) -> Result<(), String> {
    let epoch = log.topic_epoch(TOPIC).await.map_err(|e| e.to_string())?;
    let meeting = store.clone();
    let reset = tokio::task::spawn_blocking(move || meeting.http_meet_epoch(epoch))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if reset {
        tracing::warn!(topic = TOPIC, epoch, "the requests topic was made again; reading it from 0");
    }
    Ok(())
}

/// Read one page of `partition` and take it in: `None` when there was nothing new.
async fn read_partition(
    log: &dyn EventLog,
    store: &Arc<Store>,
    key: &HostKey,
    me: u64,
    partition: u32,
    recheck: bool,
) -> Result<Option<Vec<Due>>, String> {
    let from = store.http_read_next(partition).map_err(|e| e.to_string())?;
    let records = match log.poll(TOPIC, partition, from, PAGE).await {
        Ok(records) => records,
        Err(LogError::NoSuchTopic(_) | LogError::NoSuchPartition { .. }) => return Ok(None),
        Err(error) => return Err(error.to_string()),
    };
    if records.is_empty() {
        if recheck && from > 0 && log.high_watermark(TOPIC, partition).await.is_ok_and(|end| end < from) {
            // Made again: its offsets start over. Ids seen before are still known as copies.
            tracing::warn!(
                topic = TOPIC,
                partition,
                from,
                "the requests topic is shorter than where this host stood; reading it from 0"
            );
            let resetting = store.clone();
            tokio::task::spawn_blocking(move || {
                resetting.http_take_in(partition, 0, Vec::new(), me, |_, _| unreachable!())
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        }
        return Ok(None);
    }
    let next = records.last().map_or(from, |r| r.offset + 1);
    let claims = decode_page(key, partition, &records);
    let (taking, key) = (store.clone(), key.clone());
    let taken = tokio::task::spawn_blocking(move || {
        taking.http_take_in(partition, next, claims, me, |claim, error| {
            crate::metrics::metrics().http_requests.with_label_values(&[&claim.plugin, "failed"]).inc();
            super::worker::dead_letter(&key, claim, error, None)
        })
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    Ok(Some(taken))
}

/// The requests of a page; records that carry none are skipped, in one log line a page.
fn decode_page(key: &HostKey, partition: u32, records: &[Record]) -> Vec<record::Claim> {
    let mut claims = Vec::with_capacity(records.len());
    let mut skipped: Option<(u64, String)> = None;
    let mut count = 0;
    for r in records {
        match record::decode(key, r) {
            Ok(claim) => claims.push(claim),
            Err(why) => {
                count += 1;
                skipped.get_or_insert((r.offset, why));
            }
        }
    }
    if let Some((offset, why)) = skipped {
        tracing::warn!(
            topic = TOPIC,
            partition,
            count,
            first = offset,
            "skipping records of the requests topic; the first: {why}"
        );
    }
    claims
}
