//! The `EventLog` contract as tests, written once and run against every backend.
//! A backend's test module calls each function with a way to open the log on a directory
//! (opening twice on the same directory must see the same data). Appends may become
//! visible to readers a moment after they are acknowledged (Iggy forwards from a local
//! spool), so readers here wait for what they expect, up to a limit.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{AppendItem, EventLog, LogError, Record};
use crate::envelope::Envelope;

pub type Open = dyn Fn(&Path) -> Arc<dyn EventLog>;

/// The whole suite as tests of one backend. `$backend` is evaluated in each test and gives
/// `(guard, open)`: `open` opens the log on a directory, `guard` (a server, say) lives as
/// long as the test. The tests are compiled as ignored under the cfg `skip_if` names
/// (`any()`: never), so a skipped backend shows in cargo's summary.
macro_rules! contract_suite {
    (skip_if: $skip:meta, $backend:expr) => {
        $crate::log::contract::contract_suite!(@each $skip, $backend;
            appends_keep_order_per_partition,
            a_repeated_event_id_is_stored_once,
            appends_survive_a_reopen,
            an_append_wakes_a_waiting_reader,
            concurrent_appends_all_land,
            unknown_topics_are_errors,
            forwarded_entries_land_by_key_in_order_and_wake_readers,
        );
    };
    (@each $skip:meta, $backend:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread")]
        #[cfg_attr($skip, ignore = "SKIPPED: OWLERY_SKIP_IGGY=1")]
        async fn $name() {
            let (_guard, open) = $backend;
            let dir = tempfile::tempdir().unwrap();
            $crate::log::contract::$name(&open, dir.path()).await;
        }
    )*};
}
pub(crate) use contract_suite;

const VISIBLE_WITHIN: Duration = Duration::from_secs(15);

fn item(topic: &str, key: &str, n: u64) -> AppendItem {
    let envelope = Envelope::from_producer(json!({"eventType": "test.n", "data": {"n": n}, "userId": key})).unwrap();
    AppendItem { topic: topic.to_owned(), key: key.to_owned(), envelope }
}

fn n_of(payload: &[u8]) -> u64 {
    Envelope::from_bytes(payload).unwrap().data["n"].as_u64().unwrap()
}

/// Every record of a partition once there are at least `count`.
async fn read_all(log: &Arc<dyn EventLog>, topic: &str, partition: u32, count: usize) -> Vec<Record> {
    let deadline = Instant::now() + VISIBLE_WITHIN;
    loop {
        let records = match log.poll(topic, partition, 0, 100_000).await {
            Ok(records) => records,
            Err(LogError::NoSuchTopic(_) | LogError::Unavailable(_)) => Vec::new(),
            Err(e) => panic!("poll {topic}/{partition}: {e}"),
        };
        if records.len() >= count {
            return records;
        }
        assert!(Instant::now() < deadline, "{topic}/{partition} has {} records, want {count}", records.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Records of one key land in one partition, in append order, at consecutive offsets.
pub async fn appends_keep_order_per_partition(open: &Open, dir: &Path) {
    let log = open(dir);
    log.ensure_topics(&["t".to_owned()]).await.unwrap();
    let items: Vec<_> = (0..50).map(|n| item("t", if n % 2 == 0 { "alice" } else { "bob" }, n)).collect();
    let appended = log.append(items).await.unwrap();
    assert_eq!(appended.len(), 50);
    let alice = appended[0].partition;
    assert!(appended.iter().step_by(2).all(|a| a.partition == alice && !a.duplicate));
    let in_partition = appended.iter().filter(|a| a.partition == alice).count();
    let records = read_all(&log, "t", alice, in_partition).await;
    assert_eq!(records.len(), in_partition);
    let ns: Vec<u64> = records.iter().map(|r| n_of(&r.payload)).filter(|n| n % 2 == 0).collect();
    assert_eq!(ns, (0..50).step_by(2).collect::<Vec<_>>());
    let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (0..records.len() as u64).collect::<Vec<_>>());
    assert_eq!(log.high_watermark("t", alice).await.unwrap(), records.len() as u64);
    let tail = log.poll("t", alice, 3, 2).await.unwrap();
    assert_eq!(tail.iter().map(|r| r.offset).collect::<Vec<_>>(), [3, 4]);
    assert!(log.poll("t", alice, 10_000, 10).await.unwrap().is_empty());
}

/// A repeated eventId is stored once and answered with the first copy's position.
pub async fn a_repeated_event_id_is_stored_once(open: &Open, dir: &Path) {
    let log = open(dir);
    log.ensure_topics(&["d".to_owned()]).await.unwrap();
    let first = item("d", "k", 1);
    let a = log.append(vec![first.clone()]).await.unwrap();
    let b = log.append(vec![first.clone(), first]).await.unwrap();
    assert!(!a[0].duplicate);
    assert!(b.iter().all(|x| x.duplicate && x.offset == a[0].offset && x.partition == a[0].partition));
    // A later event proves the duplicates were not queued behind the first copy.
    log.append(vec![item("d", "k", 2)]).await.unwrap();
    let records = read_all(&log, "d", a[0].partition, 2).await;
    assert_eq!(records.iter().map(|r| n_of(&r.payload)).collect::<Vec<_>>(), [1, 2]);
}

/// What was acknowledged is there after the log is closed and opened again.
pub async fn appends_survive_a_reopen(open: &Open, dir: &Path) {
    let partition = {
        let log = open(dir);
        log.ensure_topics(&["durable".to_owned()]).await.unwrap();
        log.append((0..10).map(|n| item("durable", "k", n)).collect()).await.unwrap()[0].partition
    };
    let log = open(dir);
    let records = read_all(&log, "durable", partition, 10).await;
    assert_eq!(records.iter().map(|r| n_of(&r.payload)).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
    log.append(vec![item("durable", "k", 10)]).await.unwrap();
    let records = read_all(&log, "durable", partition, 11).await;
    assert_eq!(records.last().map(|r| (r.offset, n_of(&r.payload))), Some((10, 10)), "offsets continue after a reopen");
}

/// A reader waiting on `changes` is woken by an append.
pub async fn an_append_wakes_a_waiting_reader(open: &Open, dir: &Path) {
    let log = open(dir);
    log.ensure_topics(&["w".to_owned()]).await.unwrap();
    // Let start-up activity settle, then wait for the append's own wake-up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut changes = log.changes();
    changes.borrow_and_update();
    let writer = log.clone();
    let append = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer.append(vec![item("w", "k", 7)]).await.unwrap()
    });
    let partition = append.await.unwrap()[0].partition;
    let deadline = Instant::now() + VISIBLE_WITHIN;
    loop {
        tokio::time::timeout(VISIBLE_WITHIN, changes.changed()).await.expect("woken").unwrap();
        if !log.poll("w", partition, 0, 10).await.unwrap_or_default().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "woken, but the record never showed");
    }
    let records = log.poll("w", partition, 0, 10).await.unwrap();
    assert_eq!(n_of(&records[0].payload), 7);
}

/// Concurrent appends all land, each at a distinct offset.
pub async fn concurrent_appends_all_land(open: &Open, dir: &Path) {
    let log = open(dir);
    log.ensure_topics(&["c".to_owned()]).await.unwrap();
    let tasks: Vec<_> = (0..32)
        .map(|n| {
            let log = log.clone();
            tokio::spawn(async move { log.append(vec![item("c", "same-key", n)]).await.unwrap() })
        })
        .collect();
    let mut partition = 0;
    for t in tasks {
        partition = t.await.unwrap()[0].partition;
    }
    let records = read_all(&log, "c", partition, 32).await;
    assert_eq!(records.iter().map(|r| r.offset).collect::<Vec<_>>(), (0..32).collect::<Vec<_>>());
    let mut ns: Vec<u64> = records.iter().map(|r| n_of(&r.payload)).collect();
    ns.sort();
    assert_eq!(ns, (0..32).collect::<Vec<_>>());
}

/// Unknown topics and partitions are errors, not empty answers.
pub async fn unknown_topics_are_errors(open: &Open, dir: &Path) {
    let log = open(dir);
    log.ensure_topics(&["known".to_owned()]).await.unwrap();
    let partitions = log.partitions("known").await.unwrap();
    let deadline = Instant::now() + VISIBLE_WITHIN;
    loop {
        match log.poll("known", partitions, 0, 1).await {
            Err(LogError::NoSuchPartition { .. }) => break,
            other => assert!(Instant::now() < deadline, "polling past the last partition: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(log.poll("missing", 0, 0, 1).await, Err(LogError::NoSuchTopic(_))));
    assert!(log.topics().await.unwrap().contains(&"known".to_owned()));
}

/// `forward` (the outbox's way in) puts entries where `append` would, by key, in order, and
/// wakes readers once it answers; sending the same entries again after a failure is allowed.
pub async fn forwarded_entries_land_by_key_in_order_and_wake_readers(open: &Open, dir: &Path) {
    let log = open(dir);
    log.ensure_topics(&["f".to_owned()]).await.unwrap();
    let items: Vec<_> = (0..20).map(|n| item("f", if n % 2 == 0 { "alice" } else { "bob" }, n)).collect();
    let mut changes = log.changes();
    changes.borrow_and_update();
    // As the outbox does: try again until the log takes them (Iggy may not be connected yet).
    let deadline = Instant::now() + VISIBLE_WITHIN;
    while let Err(error) = log.forward(items.clone()).await {
        assert!(Instant::now() < deadline, "forward kept failing: {error}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(changes.has_changed().unwrap(), "readers are woken once it answers");
    let partitions = log.partitions("f").await.unwrap();
    let alice = crate::log::partition_for("alice", partitions);
    let records = read_all(&log, "f", alice, 10).await;
    let ns: Vec<u64> = records.iter().map(|r| n_of(&r.payload)).filter(|n| n % 2 == 0).collect();
    assert_eq!(ns, (0..20).step_by(2).collect::<Vec<_>>(), "alice's, in order, where append puts them");
    assert_eq!(log.forward(items[..2].to_vec()).await.map_err(|e| e.to_string()), Ok(()), "sent again");
}
