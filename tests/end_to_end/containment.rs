//! Containment (issue #12): whatever a plugin does — block in WASI, run away, recurse, flood
//! state, broadcasts, publishes or logs, sleep in `init` or `query` — its call ends at its
//! deadline or at a limit, the failing event is dead-lettered, the host stays responsive
//! and small, and every other plugin carries on.
//!
//! Each test runs one host with several misbehaving plugins (the `misbehave` test guest,
//! its behaviour chosen by `[config]`). Every wait has a deadline and every request a
//! timeout, so a host that hangs fails the test instead of hanging it; time limits carry
//! generous margins over the contract (these run on a loaded machine).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Host, event, guests, shipped};

/// A request not answered within this is taken as hanging.
const HANG: Duration = Duration::from_secs(10);
/// The longest any state is waited for.
const WAIT: Duration = Duration::from_secs(30);
/// The contract: a call ends within its deadline plus this.
const CALL_GRACE: Duration = Duration::from_millis(200);
/// The contract: operations on a stuck plugin answer within 2 s; plus a margin for load.
const OPERATION_LIMIT: Duration = Duration::from_millis(3_000);
/// Slack added to every other time bound for a loaded 2-core machine.
const MARGIN: Duration = Duration::from_secs(1);

type Plugin = (String, PathBuf, String);

/// A `misbehave` plugin reading topic `events`, with these `[capabilities]`, `[limits]` and
/// `[config]` lines.
fn misbehave(name: &str, capabilities: &str, limits: &str, config: &str) -> Plugin {
    let manifest = format!(
        "[subscribe]\ntopics = [\"events\"]\n\n[capabilities]\n{capabilities}\n\n[limits]\n{limits}\n\n[config]\n{config}\n"
    );
    (name.to_owned(), PathBuf::from(guests::MISBEHAVE), manifest)
}

/// `n` `test.tick` events, those at `poisoned` with `data.poison = true`.
fn ticks(n: usize, poisoned: &[usize]) -> Vec<Value> {
    (0..n)
        .map(|i| {
            if poisoned.contains(&i) {
                event("test.tick", json!({"n": i, "poison": true}))
            } else {
                event("test.tick", json!({"n": i}))
            }
        })
        .collect()
}

/// Post events; the stored envelopes (eventId, partition, offset) in order.
async fn post(host: &Host, events: Vec<Value>) -> Vec<Value> {
    let (status, body) = host.post_events(&json!(events)).await;
    assert_eq!(status, 201, "{body}");
    body["events"].as_array().unwrap().clone()
}

/// Where a stored event sits, as status and dead letters name it.
fn at(stored: &Value) -> String {
    format!("events/{}/{}", stored["partition"], stored["offset"])
}

struct Answer {
    status: u16,
    body: Value,
    took: Duration,
}

/// Send a request, timed; a request that hangs fails the test after [`HANG`].
async fn send(request: reqwest::RequestBuilder, what: &str) -> Answer {
    let started = Instant::now();
    let response = match request.timeout(HANG).send().await {
        Ok(response) => response,
        Err(e) => panic!("{what}: no answer within {HANG:?} ({e})"),
    };
    let status = response.status().as_u16();
    let text = match response.text().await {
        Ok(text) => text,
        Err(e) => panic!("{what}: the body did not arrive within {HANG:?} ({e})"),
    };
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer { status, body, took: started.elapsed() }
}

async fn get(host: &Host, path: &str) -> Answer {
    send(host.http.get(host.url(path)), &format!("GET {path}")).await
}

async fn status(host: &Host, name: &str) -> Value {
    let answer = get(host, &format!("/api/plugins/{name}")).await;
    assert_eq!(answer.status, 200, "status of {name}: {}", answer.body);
    answer.body
}

/// The plugin's `count` (what the misbehave guest counted).
async fn count(host: &Host, name: &str) -> Value {
    let answer = get(host, &format!("/api/plugins/{name}/query")).await;
    assert_eq!(answer.status, 200, "query {name}: {}", answer.body);
    answer.body["count"].clone()
}

/// Probe until it says `Ok`, for at most `limit`; `Err` carries what it saw, for the message.
async fn wait_for<T>(what: &str, limit: Duration, mut probe: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(seen) => assert!(Instant::now() < deadline, "{what}: not within {limit:?}; last seen: {seen}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until `name` has dead-lettered `letters` events, read everything and runs; its status.
async fn settled(host: &Host, name: &str, letters: u64) -> Value {
    wait_for(&format!("{name} dead-letters {letters} and moves on"), WAIT, async || {
        let status = status(host, name).await;
        if status["deadLetters"] == letters && status["lag"] == 0 && status["state"] == "running" {
            Ok(status)
        } else {
            Err(status.to_string())
        }
    })
    .await
}

/// Wait until `analytics` has counted `total` events.
async fn analytics_counts(host: &Host, total: u64, limit: Duration) {
    wait_for(&format!("analytics counts {total}"), limit, async || {
        let answer = get(host, "/api/plugins/analytics/query").await;
        if answer.body["total"] == total { Ok(()) } else { Err(answer.body.to_string()) }
    })
    .await
}

/// Wait until the host log has a line containing every one of `words`.
async fn logged(host: &Host, words: &[&str], limit: Duration) {
    wait_for(&format!("a log line with {words:?}"), limit, async || {
        let log = host.log();
        if log.lines().any(|line| words.iter().all(|w| line.contains(w))) { Ok(()) } else { Err("no such line".into()) }
    })
    .await
}

/// `deadLetters` 1 of `name`, naming the poisoned event, and `count` of every other event.
async fn dead_lettered_once(host: &Host, name: &str, poisoned: &Value, others: u64) -> Value {
    let status = settled(host, name, 1).await;
    let last_error = status["lastError"].as_str().unwrap_or_default();
    assert!(last_error.contains(&at(poisoned)), "{name}: lastError names the poisoned event: {status}");
    assert_eq!(count(host, name).await, others, "{name} counts every other event");
    status
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_blocked_in_wasi_or_running_away_end_at_their_deadline() {
    let limits = "memory_mb = 16\nbatch_timeout_ms = 300\nmax_batch = 64\nretries = 1";
    let deadline = Duration::from_millis(300);
    let host = Host::with_plugins(&[
        misbehave("sleeper", "", limits, "mode = \"sleep\""),
        misbehave("poller", "", limits, "mode = \"poll_many\""),
        misbehave("reader", "", limits, "mode = \"stdin\""),
        misbehave("recurser", "", limits, "mode = \"recurse\""),
        misbehave("hog", "", limits, "mode = \"alloc\""),
        shipped("analytics"),
    ]);
    let posted_at = Instant::now();
    let stored = post(&host, ticks(10, &[5])).await;
    let poisoned = &stored[5];

    // Nobody else waits for the stuck ones.
    analytics_counts(&host, 10, Duration::from_secs(5) + MARGIN).await;

    // At most 2 failing attempts at the batch and 2 at the event alone, each cut at its
    // deadline plus the grace: the event is dead-lettered well within this.
    let bound = (deadline + CALL_GRACE) * 4 + Duration::from_secs(2) + MARGIN * 4;
    for name in ["reader", "recurser", "hog", "sleeper", "poller"] {
        let status = dead_lettered_once(&host, name, poisoned, 9).await;
        let took = posted_at.elapsed();
        eprintln!("{name}: {}", status["lastError"]);
        assert!(took < bound, "{name} dead-lettered the poisoned event after {took:?}, over {bound:?}: {status}");
    }
    for name in ["sleeper", "poller"] {
        let status = status(&host, name).await;
        assert!(status["lastError"].as_str().unwrap().contains("timed out"), "{name}: {status}");
    }

    let letters = wait_for("five dead letters", WAIT, async || {
        let letters = host.topic_records("dead-letters").await;
        if letters.len() >= 5 { Ok(letters) } else { Err(format!("{} letters", letters.len())) }
    })
    .await;
    let mut plugins: Vec<_> =
        letters.iter().map(|l| l["event"]["data"]["plugin"].as_str().unwrap().to_owned()).collect();
    plugins.sort();
    assert_eq!(plugins, ["hog", "poller", "reader", "recurser", "sleeper"]);
    for letter in &letters {
        assert_eq!(letter["event"]["data"]["event"]["eventId"], poisoned["eventId"]);
    }
    let answer = get(&host, "/health").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    eprintln!(
        "calls_blocked_in_wasi_or_running_away_end_at_their_deadline: settled {:?} after posting",
        posted_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn output_limits_fail_the_call_name_the_limit_and_are_counted() {
    let limits = "memory_mb = 32\nbatch_timeout_ms = 2000\nmax_batch = 64\nretries = 1";
    let host = Host::with_plugins(&[
        misbehave("bigvalues", "", limits, "mode = \"state_big\""),
        misbehave("manyvalues", "", limits, "mode = \"state_many\""),
        misbehave("hugekey", "", limits, "mode = \"huge_key\""),
        misbehave("broadcaster", "broadcast = true", limits, "mode = \"broadcast_flood\""),
        misbehave("publisher", "publish = [\"test.*\"]", limits, "mode = \"publish_flood\""),
        shipped("analytics"),
    ]);
    let mut flood_room = host.ws("?rooms=flood").await;
    let stored = post(&host, ticks(10, &[5])).await;
    let poisoned = &stored[5];
    analytics_counts(&host, 10, Duration::from_secs(5) + MARGIN).await;

    for (name, limit) in [
        ("bigvalues", "max_state_value_bytes"),
        ("manyvalues", "output_bytes_per_batch"),
        ("hugekey", "max_state_key_bytes"),
        ("broadcaster", "output_bytes_per_batch"),
        ("publisher", "output_bytes_per_batch"),
    ] {
        let status = dead_lettered_once(&host, name, poisoned, 9).await;
        let last_error = status["lastError"].as_str().unwrap();
        assert!(last_error.contains(limit), "{name}: lastError names the limit {limit}: {status}");
        assert!(status["limitHits"].as_u64().is_some_and(|n| n > 0), "{name}: limitHits counts the hit: {status}");
        logged(&host, &[name, limit], Duration::from_secs(2)).await;
    }

    // A failed call leaves no trace: no broadcast went out, nothing was published.
    assert!(flood_room.next_event(Duration::from_millis(500)).await.is_none(), "a flood broadcast got out");
    let published: Vec<_> = host
        .topic_records("events")
        .await
        .into_iter()
        .filter(|r| r["event"]["eventType"] != "test.tick")
        .map(|r| r["event"]["eventType"].clone())
        .collect();
    assert!(published.is_empty(), "a flood publish got out: {published:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn log_floods_are_cut_counted_and_warned_about() {
    let host = Host::with_plugins(&[
        // 64 lines of 1 MiB on stdout, then done: the call succeeds.
        misbehave("printer", "", "batch_timeout_ms = 3000", "mode = \"log_flood\"\nrepeat = 64"),
        // 64 lines of 1 MiB through the host's log import, then done.
        misbehave("shouter", "", "batch_timeout_ms = 3000", "mode = \"hostlog_flood\"\nrepeat = 64"),
        // 1 MiB lines on stdout until the deadline.
        misbehave("flooder", "", "batch_timeout_ms = 300\nretries = 1", "mode = \"log_flood\""),
        shipped("analytics"),
    ]);
    let stored = post(&host, ticks(10, &[5])).await;
    analytics_counts(&host, 10, Duration::from_secs(5) + MARGIN).await;

    for name in ["printer", "shouter"] {
        let status = wait_for(&format!("{name} handles all ten"), WAIT, async || {
            let status = status(&host, name).await;
            if status["processed"] == 10 && status["lag"] == 0 { Ok(status) } else { Err(status.to_string()) }
        })
        .await;
        assert_eq!(status["deadLetters"], 0, "log excess does not fail the call: {status}");
        assert_eq!(count(&host, name).await, 10, "{name}");
    }
    dead_lettered_once(&host, "flooder", &stored[5], 9).await;

    let log_size = std::fs::metadata(host.dir.path().join("owlery.log")).unwrap().len();
    for name in ["printer", "shouter", "flooder"] {
        let status = status(&host, name).await;
        assert!(status["logBytesDropped"].as_u64().is_some_and(|n| n > 0), "{name}: {status}");
        logged(&host, &[name, "log_bytes_per_batch"], Duration::from_secs(2)).await;
        let log = host.log();
        let warnings = log.lines().filter(|l| l.contains(name) && l.contains("log_bytes_per_batch")).count();
        assert!(warnings <= 20, "{name}: one warning per call, not per line: {warnings}");
    }
    assert!(log_size < 5 << 20, "the host log grew to {log_size} bytes");
}

#[tokio::test(flavor = "multi_thread")]
async fn stuck_queries_time_out_and_excess_queries_are_turned_away() {
    let limits = "query_timeout_ms = 300\nmax_queued_queries = 2";
    let query_deadline = Duration::from_millis(300);
    let host = Host::with_plugins(&[
        misbehave("qsleeper", "", limits, "mode = \"error\"\nquery = \"sleep\""),
        misbehave("qlooper", "", limits, "mode = \"error\"\nquery = \"loop\""),
    ]);

    // One query alone: 504 with a JSON error, within the query deadline plus 1 s.
    for name in ["qsleeper", "qlooper"] {
        let answer = get(&host, &format!("/api/plugins/{name}/query")).await;
        assert_eq!(answer.status, 504, "{name}: {}", answer.body);
        assert!(answer.body["error"].is_string(), "{name}: {}", answer.body);
        let bound = query_deadline + Duration::from_secs(1) + MARGIN;
        assert!(answer.took < bound, "{name}: answered after {:?}", answer.took);
    }

    // Many at once: past the queue, 503 at once; the rest 504 at their deadlines. Meanwhile
    // the plugins handle events.
    for name in ["qsleeper", "qlooper"] {
        let path = format!("/api/plugins/{name}/query");
        let queries: Vec<_> = (0..12)
            .map(|_| {
                let request = host.http.get(host.url(&path));
                let what = format!("GET {path}");
                tokio::spawn(async move { send(request, &what).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        post(&host, ticks(5, &[])).await;
        let mut answers = Vec::new();
        for query in queries {
            answers.push(query.await.unwrap());
        }
        let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
        assert!(statuses.iter().all(|s| *s == 503 || *s == 504), "{name}: {statuses:?}");
        assert!(statuses.contains(&503), "{name}: more than max_queued_queries are refused: {statuses:?}");
        // The one running and the two queued each take a deadline; the rest none.
        let bound = (query_deadline + CALL_GRACE) * 3 + Duration::from_secs(1) + MARGIN * 2;
        for answer in &answers {
            assert!(answer.body["error"].is_string(), "{name}: {}", answer.body);
            assert!(answer.took < bound, "{name}: a query answered after {:?}, over {bound:?}", answer.took);
        }
    }
    for name in ["qsleeper", "qlooper"] {
        wait_for(&format!("{name} handles events while its queries are stuck"), Duration::from_secs(5), async || {
            let status = status(&host, name).await;
            if status["processed"] == 10 && status["lag"] == 0 { Ok(()) } else { Err(status.to_string()) }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_are_capped_bounded_and_checked_for_memory() {
    let mut host = Host::with_config(&[shipped("analytics")], "max_upload_mb = 1\n");
    let put = |name: &str, wasm: Vec<u8>, manifest: &str| host.upload(name, wasm, Some(manifest));
    let misbehave_wasm = std::fs::read(guests::MISBEHAVE).unwrap();
    let big_memory_wasm = std::fs::read(guests::BIG_MEMORY).unwrap();
    assert!(misbehave_wasm.len() < 1 << 20 && big_memory_wasm.len() < 1 << 20, "the guests fit under the cap");

    // Over the cap: 413.
    let answer = send(put("toobig", vec![0u8; 2 << 20], ""), "PUT 2 MiB").await;
    assert_eq!(answer.status, 413, "{}", answer.body);

    // An init that sleeps: refused within its deadline plus 2 s, holding up no other upload.
    let sleepy_manifest =
        "[subscribe]\ntopics = [\"events\"]\n[limits]\nbatch_timeout_ms = 500\n[config]\ninit = \"sleep\"";
    let sleepy = tokio::spawn(send(put("sleepy", misbehave_wasm.clone(), sleepy_manifest), "PUT sleepy"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let quick_manifest = "[subscribe]\ntopics = [\"events\"]\n[config]\nmode = \"error\"";
    let quick = send(put("quick", misbehave_wasm.clone(), quick_manifest), "PUT quick").await;
    assert_eq!(quick.status, 201, "{}", quick.body);
    assert!(quick.took < Duration::from_secs(3) + MARGIN, "quick took {:?}", quick.took);
    let sleepy = sleepy.await.unwrap();
    assert!((400..500).contains(&sleepy.status), "{} {}", sleepy.status, sleepy.body);
    assert!(sleepy.body["error"].is_string(), "{}", sleepy.body);
    let bound = Duration::from_millis(500) + Duration::from_secs(2) + MARGIN;
    assert!(sleepy.took < bound, "the sleepy upload answered after {:?}", sleepy.took);

    // A component declaring more memory than its cap: 400 naming memory. With room, it runs.
    let small = "[subscribe]\ntopics = [\"events\"]\n[limits]\nmemory_mb = 64";
    let answer = send(put("bigmem", big_memory_wasm.clone(), small), "PUT bigmem").await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    let error = answer.body["error"].as_str().unwrap_or_default();
    assert!(error.to_lowercase().contains("memory"), "{}", answer.body);
    let roomy = "[subscribe]\ntopics = [\"events\"]\n[limits]\nmemory_mb = 512";
    let answer = send(put("bigmem", big_memory_wasm, roomy), "PUT bigmem").await;
    assert_eq!(answer.status, 201, "{}", answer.body);

    post(&host, ticks(3, &[])).await;
    for name in ["quick", "bigmem"] {
        wait_for(&format!("{name} counts three"), Duration::from_secs(10), async || {
            let answer = get(&host, &format!("/api/plugins/{name}/query")).await;
            if answer.body["count"] == 3 { Ok(()) } else { Err(answer.body.to_string()) }
        })
        .await;
    }
    analytics_counts(&host, 3, Duration::from_secs(5)).await;
    host.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_host_listens_and_loads_the_others_whatever_an_init_does() {
    let sleepy_limits = "batch_timeout_ms = 500";
    let started = Instant::now();
    let host = Host::with_plugins(&[
        misbehave("sleepy", "", sleepy_limits, "init = \"sleep\""),
        misbehave("counter", "", "", "mode = \"error\""),
        shipped("analytics"),
    ]);
    let listening = started.elapsed();
    let answer = get(&host, "/health").await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    post(&host, ticks(3, &[])).await;
    analytics_counts(&host, 3, Duration::from_secs(10)).await;
    wait_for("counter counts three", Duration::from_secs(10), async || {
        let answer = get(&host, "/api/plugins/counter/query").await;
        if answer.body["count"] == 3 { Ok(()) } else { Err(answer.body.to_string()) }
    })
    .await;
    let status = wait_for("sleepy fails", Duration::from_secs(10), async || {
        let status = status(&host, "sleepy").await;
        if status["state"] == "failed" { Ok(status) } else { Err(status.to_string()) }
    })
    .await;
    assert!(status["lastError"].is_string(), "{status}");

    // Hot reload: another such plugin dropped in holds up no later one.
    let dir = host.dir.path().join("plugins");
    let drop_in = |(name, wasm, manifest): Plugin| {
        std::fs::write(dir.join(format!("{name}.toml")), manifest).unwrap();
        let tmp = dir.join(format!(".{name}.wasm.tmp"));
        std::fs::copy(wasm, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{name}.wasm"))).unwrap();
    };
    drop_in(misbehave("sleepy2", "", sleepy_limits, "init = \"sleep\""));
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop_in(misbehave("late", "", "", "mode = \"error\""));
    wait_for("late loads and counts three", Duration::from_secs(10), async || {
        let answer = get(&host, "/api/plugins/late/query").await;
        if answer.body["count"] == 3 { Ok(()) } else { Err(format!("{} {}", answer.status, answer.body)) }
    })
    .await;

    for name in ["sleepy", "sleepy2"] {
        let answer = send(host.http.delete(host.url(&format!("/api/plugins/{name}"))), "DELETE").await;
        assert!(answer.took < OPERATION_LIMIT, "DELETE {name} took {:?}", answer.took);
    }
    eprintln!("the_host_listens_and_loads_the_others_whatever_an_init_does: listening after {listening:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_plugin_answers_its_operations_and_holds_up_nobody() {
    let host = Host::with_plugins(&[
        misbehave("stuck", "", "batch_timeout_ms = 10000\nretries = 0", "mode = \"sleep\""),
        shipped("ws-broadcast"),
        shipped("analytics"),
    ]);
    let mut client = host.ws("").await;
    let poisoned = post(&host, ticks(1, &[0])).await.remove(0);
    let id = poisoned["eventId"].as_str().unwrap().to_owned();
    logged(&host, &["misbehaving on", &id], Duration::from_secs(10)).await;

    // Others keep processing and broadcasting while it sleeps.
    let incident = post(&host, vec![event("incident.created", json!({"id": 7}))]).await.remove(0);
    let frame = client.next_in_room("all", Duration::from_secs(2) + MARGIN).await;
    let frame = frame.expect("a broadcast while a plugin is stuck");
    assert_eq!(frame["event"]["eventId"], incident["eventId"]);
    analytics_counts(&host, 2, Duration::from_secs(2) + MARGIN).await;

    // Uploading a new plugin and swapping another work meanwhile.
    let misbehave_wasm = std::fs::read(guests::MISBEHAVE).unwrap();
    let manifest = "[subscribe]\ntopics = [\"incident-events\"]\n[config]\nmode = \"error\"";
    let request = host.upload("newcomer", misbehave_wasm, Some(manifest));
    let answer = send(request, "PUT newcomer").await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let analytics_wasm = std::fs::read(guests::ANALYTICS).unwrap();
    let swapped = shipped("analytics").2.replace("batch_timeout_ms = 2000", "batch_timeout_ms = 2500");
    assert_ne!(swapped, shipped("analytics").2);
    let request = host.upload("analytics", analytics_wasm, Some(&swapped));
    let answer = send(request, "PUT analytics").await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    // Every operation on the stuck plugin answers promptly.
    let base = host.url("/api/plugins/stuck");
    let operations = [
        ("GET query", host.http.get(format!("{base}/query"))),
        ("POST pause", host.http.post(format!("{base}/pause"))),
        ("GET query", host.http.get(format!("{base}/query"))),
        ("POST resume", host.http.post(format!("{base}/resume"))),
        ("POST replay", host.http.post(format!("{base}/replay")).json(&json!({"from": 0}))),
        ("GET query", host.http.get(format!("{base}/query"))),
        ("DELETE", host.http.delete(base.clone())),
    ];
    for (what, request) in operations {
        let answer = send(request, what).await;
        assert!(answer.took < OPERATION_LIMIT, "{what} on the stuck plugin took {:?}", answer.took);
        if what == "GET query" {
            assert!([200, 503, 504].contains(&answer.status), "{what}: {} {}", answer.status, answer.body);
            assert!(answer.body.is_object(), "{what}: {}", answer.body);
        } else {
            assert!((200..300).contains(&answer.status), "{what}: {} {}", answer.status, answer.body);
        }
    }
    assert_eq!(get(&host, "/api/plugins/stuck").await.status, 404);

    // And everyone else is still there.
    let incident = post(&host, vec![event("incident.created", json!({"id": 8}))]).await.remove(0);
    let frame = client.next_in_room("all", Duration::from_secs(2) + MARGIN).await.expect("a broadcast afterwards");
    assert_eq!(frame["event"]["eventId"], incident["eventId"]);
    analytics_counts(&host, 3, Duration::from_secs(5)).await;
    wait_for("the newcomer counts both incidents", Duration::from_secs(5), async || {
        let answer = get(&host, "/api/plugins/newcomer/query").await;
        if answer.body["count"] == 2 { Ok(()) } else { Err(answer.body.to_string()) }
    })
    .await;
}

/// Operators' commands and queries in quick turns on a plugin asleep in `handle`: each
/// command is answered by a runner that may be waiting or in a call, and no query waits for
/// the whole call. Seen once in CI: a command answered before its interrupt was raised
/// ended the next call for nothing, which spent the one interruption a query gets per
/// batch, and the next query waited for the call's 10 s deadline. A second query in a row
/// may not end the call either: it answers 504 at its own deadline.
#[tokio::test(flavor = "multi_thread")]
async fn queries_between_quick_commands_on_a_sleeping_plugin_all_answer_promptly() {
    let host =
        Host::with_plugins(&[misbehave("stuck", "", "batch_timeout_ms = 20000\nretries = 0", "mode = \"sleep\"")]);
    let poisoned = post(&host, ticks(1, &[0])).await.remove(0);
    let id = poisoned["eventId"].as_str().unwrap().to_owned();
    logged(&host, &["misbehaving on", &id], Duration::from_secs(10)).await;
    let base = host.url("/api/plugins/stuck");
    for round in 0..8 {
        let operations = [
            ("POST pause", host.http.post(format!("{base}/pause"))),
            ("POST resume", host.http.post(format!("{base}/resume"))),
            ("GET query", host.http.get(format!("{base}/query"))),
            ("POST replay", host.http.post(format!("{base}/replay")).json(&json!({"from": 0}))),
            ("GET query", host.http.get(format!("{base}/query"))),
            ("GET query", host.http.get(format!("{base}/query"))),
        ];
        for (what, request) in operations {
            let answer = send(request, what).await;
            assert!(answer.took < OPERATION_LIMIT, "round {round}: {what} took {:?}", answer.took);
            let fine = if what == "GET query" { [200, 504].contains(&answer.status) } else { answer.status < 300 };
            assert!(fine, "round {round}: {what}: {} {}", answer.status, answer.body);
            if answer.status == 504 {
                let error = answer.body["error"].as_str().unwrap_or_default();
                assert!(error.contains("query_timeout_ms") && error.contains("stuck"), "{}", answer.body);
            }
        }
    }
}

/// Queries that gave up (504) behind a batch they may not end count no more as waiting:
/// the next ones wait their own deadline again instead of being turned away with 503.
#[tokio::test(flavor = "multi_thread")]
async fn queries_that_gave_up_behind_a_sleeping_batch_leave_room_for_the_next() {
    let limits = "batch_timeout_ms = 20000\nretries = 0\nquery_timeout_ms = 300\nmax_queued_queries = 1";
    let host = Host::with_plugins(&[misbehave("stuck", "", limits, "mode = \"sleep\"")]);
    let poisoned = post(&host, ticks(1, &[0])).await.remove(0);
    let id = poisoned["eventId"].as_str().unwrap().to_owned();
    logged(&host, &["misbehaving on", &id], Duration::from_secs(10)).await;
    // The first query may end the batch's call (once); the batch then runs to its end.
    let first = get(&host, "/api/plugins/stuck/query").await;
    assert!([200, 504].contains(&first.status), "{} {}", first.status, first.body);
    for n in 0..4 {
        let answer = get(&host, "/api/plugins/stuck/query").await;
        assert_eq!(answer.status, 504, "query {n}: {}", answer.body);
        assert!(answer.took < OPERATION_LIMIT, "query {n} took {:?}", answer.took);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_host_while_plugins_sleep_in_handle() {
    let limits = "batch_timeout_ms = 60000";
    let mut host = Host::with_plugins(&[
        misbehave("sleeper", "", limits, "mode = \"sleep\""),
        misbehave("poller", "", limits, "mode = \"poll_many\""),
        shipped("analytics"),
    ]);
    let poisoned = post(&host, ticks(1, &[0])).await.remove(0);
    let id = poisoned["eventId"].as_str().unwrap().to_owned();
    // Both are inside their sleeping call (each prints before it misbehaves).
    wait_for("both plugins are stuck", Duration::from_secs(10), async || {
        let log = host.log();
        let stuck = log.lines().filter(|l| l.contains("misbehaving on") && l.contains(&id)).count();
        if stuck >= 2 { Ok(()) } else { Err(format!("{stuck} stuck")) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let limit = Duration::from_secs(5) + MARGIN;
    let (took, exit) = host.terminate(Duration::from_secs(15));
    let exit = exit.unwrap_or_else(|| panic!("owlery still ran {took:?} after SIGTERM; log:\n{}", host.log_tail()));
    assert!(took < limit, "owlery took {took:?} to stop on SIGTERM ({exit})");
    eprintln!("sigterm_stops_the_host_while_plugins_sleep_in_handle: stopped after {took:?} with {exit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn flooding_plugins_do_not_grow_the_host_past_their_memory() {
    let limits = "memory_mb = 32\nbatch_timeout_ms = 1000\nmax_batch = 64\nretries = 1";
    let host = Host::with_plugins(&[
        misbehave("bigvalues", "", limits, "mode = \"state_big\""),
        misbehave("broadcaster", "broadcast = true", limits, "mode = \"broadcast_flood\""),
        misbehave("publisher", "publish = [\"test.*\"]", limits, "mode = \"publish_flood\""),
    ]);
    let allowance: u64 = 3 * (32 << 20) + (256 << 20);
    let (rss_at_start, peak_at_start) = host.memory();

    // Sample the resident memory while the three are stopped by their limits, three
    // poisoned events each (a dozen limit hits and more).
    let pid = host.pid();
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut highest = 0u64;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    && let Some(line) = status.lines().find(|l| l.starts_with("VmRSS:"))
                {
                    let kib: u64 = line["VmRSS:".len()..].trim().trim_end_matches("kB").trim().parse().unwrap();
                    highest = highest.max(kib << 10);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            highest
        })
    };
    post(&host, ticks(6, &[1, 3, 5])).await;
    for name in ["bigvalues", "broadcaster", "publisher"] {
        settled(&host, name, 3).await;
        assert_eq!(count(&host, name).await, 3, "{name}");
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let highest = sampler.join().unwrap();
    let (rss, peak) = host.memory();
    let mib = |b: u64| b >> 20;
    eprintln!(
        "flooding_plugins_do_not_grow_the_host_past_their_memory: VmRSS {} MiB at start, {} MiB at most while \
         flooding, {} MiB after; VmHWM {} MiB at start, {} MiB after; allowance {} MiB",
        mib(rss_at_start),
        mib(highest),
        mib(rss),
        mib(peak_at_start),
        mib(peak),
        mib(allowance)
    );
    assert!(highest < allowance, "resident memory reached {} MiB while flooding", mib(highest));
    assert!(rss < allowance, "resident memory is {} MiB after the floods", mib(rss));
    // The kernel's high-water mark catches a peak between two samples.
    assert!(peak < allowance, "resident memory peaked at {} MiB", mib(peak));
}

#[tokio::test(flavor = "multi_thread")]
async fn compiling_past_its_time_limit_is_refused_and_holds_up_nobody() {
    // A limit no compile meets: the upload is refused naming it, the host keeps serving.
    let host = Host::with_config(&[], "compile_timeout_ms = 1\n");
    let wasm = std::fs::read(guests::ALERTS).unwrap();
    let started = Instant::now();
    let answer = send(host.upload("slow", wasm, None), "PUT slow").await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(answer.body["error"].as_str().unwrap().contains("compile_timeout_ms"), "{}", answer.body);
    assert!(started.elapsed() < Duration::from_secs(5), "answered after {:?}", started.elapsed());
    assert_eq!(host.get("/api/plugins/slow").await.0, 404, "nothing was installed");
    assert_eq!(host.post_events(&event("incident.created", json!({"id": 1}))).await.0, 201);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_batch_is_dead_lettered_however_often_the_plugin_is_queried() {
    // Every attempt at the poisoned event times out; a dashboard queries all the while.
    let limits = "batch_timeout_ms = 300\nmax_batch = 64\nretries = 2";
    let host = Host::with_plugins(&[misbehave("sleeper", "", limits, "mode = \"sleep\"")]);
    let stored = post(&host, ticks(10, &[5])).await;
    let querying = async {
        loop {
            let _ = host.http.get(host.url("/api/plugins/sleeper/query")).send().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let settled = async { dead_lettered_once(&host, "sleeper", &stored[5], 9).await };
    let status = tokio::select! {
        status = settled => status,
        _ = querying => unreachable!(),
    };
    assert!(status["lastError"].as_str().unwrap().contains("timed out"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_grown_past_the_cap_fails_the_call_and_nothing_else() {
    // No Rust guest can emit table.grow: this one is written in the component text format.
    let text = std::fs::read_to_string(std::path::Path::new(guests::TEST_PLUGINS_DIR).join("table-grow.wat")).unwrap();
    let wasm = wat::parse_str(&text).unwrap();
    let host = Host::with_plugins(&[shipped("analytics")]);
    let manifest = "[subscribe]\ntopics = [\"events\"]\n[limits]\nretries = 0\nbatch_timeout_ms = 300";
    let answer = send(host.upload("grower", wasm, Some(manifest)), "PUT grower").await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let stored = post(&host, ticks(3, &[])).await;
    let status = settled(&host, "grower", 3).await;
    let last_error = status["lastError"].as_str().unwrap();
    assert!(last_error.contains("tables grow to"), "{status}");
    assert!(stored.iter().any(|e| last_error.contains(&at(e))), "it names the event: {status}");
    assert!(status["limitHits"].as_u64().unwrap() >= 3, "{status}");
    analytics_counts(&host, 3, WAIT).await;
    assert_eq!(get(&host, "/api/plugins/grower/query").await.status, 200, "its query still answers");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_that_keeps_failing_is_marked_failed_after_the_threshold() {
    // 100 dead letters in a row (FAIL_AFTER_DEAD_LETTERS) stop the plugin, here with calls
    // that time out blocked in WASI; the other plugins are not held up.
    let limits = "batch_timeout_ms = 50\nmax_batch = 256\nretries = 0";
    let host = Host::with_plugins(&[misbehave("sleeper", "", limits, "mode = \"sleep\""), shipped("analytics")]);
    let all: Vec<usize> = (0..100).collect();
    post(&host, ticks(100, &all)).await;
    let status = wait_for("sleeper is marked failed", WAIT, async || {
        let status = status(&host, "sleeper").await;
        if status["state"] == "failed" { Ok(status) } else { Err(status.to_string()) }
    })
    .await;
    assert_eq!(status["deadLetters"], 100, "{status}");
    assert!(status["lastError"].as_str().unwrap().contains("in a row failed"), "{status}");
    // Each call ended within its deadline plus 200 ms (50 ms + 200 ms), on average.
    let average = status["avgBatchMicros"].as_u64().unwrap();
    assert!((50_000..250_000).contains(&average), "calls took {average} µs on average: {status}");
    analytics_counts(&host, 100, WAIT).await;
}
