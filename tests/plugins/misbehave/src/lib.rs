//! A test plugin: counts the events it handles (in state), and misbehaves on an event whose
//! `data.poison` is true, as its manifest's `config.mode` says. Prints each poisoned event to
//! stdout, which the host routes to its log.
//!
//! `config.mode` (what `handle` does on a poisoned event):
//! - `trap`: panics; `error`: returns an error for the event;
//! - `loop`: spins forever; `alloc`: allocates 1 MiB blocks without bound;
//! - `sleep`: `std::thread::sleep` for an hour (a WASI poll on one clock pollable);
//! - `poll_many`: WASI `poll` on two clock pollables an hour away;
//! - `stdin`: reads stdin to its end (and fails the event if the read ever returns);
//! - `recurse`: unbounded recursion, until the stack is exhausted;
//! - `state_big`: `state-set` of 8 MiB values under new keys, in a loop;
//! - `state_many`: `state-set` of 1 KiB values under a million distinct keys, round and round;
//! - `huge_key`: one `state-set` whose key is 4 MiB long;
//! - `broadcast_flood`: broadcasts 64 KiB payloads to room `flood`, in a loop (needs the
//!   `broadcast` capability);
//! - `publish_flood`: publishes `test.flood` events with 64 KiB of data, in a loop (needs
//!   `publish = ["test.*"]`);
//! - `log_flood`: prints 1 MiB lines to stdout, in a loop;
//! - `hostlog_flood`: logs 1 MiB lines through the host's `log` import, in a loop;
//! - `http`: one `send-http` as the poisoned event's data says: `POST data.url` with
//!   headers `data.headers` (`[[name, value]]`) and a body of `data.bodyBytes` bytes (needs
//!   `[capabilities] http`).
//!
//! Loops run until the host stops them; a host import that refuses (an `Err` from
//! `broadcast` or `publish`) fails the event with the host's message. `config.repeat`, if
//! given, bounds the flood loops (`state_*`, `*_flood`) to that many rounds, after which the
//! event is counted as usual.
//!
//! `config.init = "sleep"` makes `init` sleep for an hour; `config.query = "sleep"` or
//! `"loop"` makes `query` sleep for an hour or spin forever. Without them both behave.

use std::cell::Cell;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use owlery_plugin_sdk::{Envelope, HandleError, LogLevel, Plugin, state};

#[derive(Clone, Copy)]
enum Mode {
    Trap,
    Loop,
    Alloc,
    Error,
    Sleep,
    PollMany,
    Stdin,
    Recurse,
    StateBig,
    StateMany,
    HugeKey,
    BroadcastFlood,
    PublishFlood,
    LogFlood,
    HostLogFlood,
    Http,
}

#[derive(Clone, Copy)]
enum QueryMode {
    Normal,
    Sleep,
    Loop,
}

const AN_HOUR: Duration = Duration::from_secs(3600);

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Trap) };
    static QUERY: Cell<QueryMode> = const { Cell::new(QueryMode::Normal) };
    /// Rounds of a flood loop; `None`: until the host stops it.
    static REPEAT: Cell<Option<u64>> = const { Cell::new(None) };
}

struct Misbehave;

/// Spin forever without the optimiser seeing through it.
fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

/// Rounds of a flood loop: `0, 1, 2, ...` for ever, or up to `config.repeat`.
fn rounds() -> impl Iterator<Item = u64> {
    let limit = REPEAT.get().unwrap_or(u64::MAX);
    0..limit
}

/// Where `recurse` would stop: never, but the optimiser cannot know that.
static DEPTH_LIMIT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Recursion the optimiser cannot turn into a loop (the result of the call is used in two
/// operations after it returns), each frame on the wasm call stack, until it is exhausted.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if depth == DEPTH_LIMIT.load(Ordering::Relaxed) {
        return depth;
    }
    recurse(depth + 1).wrapping_mul(3).wrapping_add(depth)
}

fn misbehave(index: usize, event: &Envelope) -> Result<(), HandleError> {
    println!("misbehaving on {}", event.event_id);
    let cause = event.event_id.as_str();
    let refused = |e: String| HandleError::at(index, e);
    match MODE.get() {
        Mode::Trap => panic!("poisoned event {}", event.event_id),
        Mode::Loop => spin(),
        Mode::Alloc => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        Mode::Error => Err(HandleError::at(index, format!("refusing poisoned event {}", event.event_id))),
        Mode::Sleep => {
            std::thread::sleep(AN_HOUR);
            Err(refused("woke up after an hour".into()))
        }
        Mode::PollMany => {
            let hour = AN_HOUR.as_nanos() as u64;
            let first = wasi::clocks::monotonic_clock::subscribe_duration(hour);
            let second = wasi::clocks::monotonic_clock::subscribe_duration(hour + 1);
            let ready = wasi::io::poll::poll(&[&first, &second]);
            Err(refused(format!("poll returned after an hour: {ready:?}")))
        }
        Mode::Stdin => {
            let mut input = Vec::new();
            // The host gives no stdin: the read must either end at once or be cut off.
            let read = std::io::stdin().read_to_end(&mut input);
            Err(refused(format!("stdin read ended: {read:?}, {} bytes", input.len())))
        }
        Mode::Recurse => {
            let depth = recurse(0);
            Err(refused(format!("recursion came back from depth {depth}")))
        }
        Mode::StateBig => {
            let value = vec![0xb1u8; 8 << 20];
            for round in rounds() {
                state::set(&format!("big/{cause}/{round}"), &value);
            }
            Ok(())
        }
        Mode::StateMany => {
            let value = vec![0x5au8; 1 << 10];
            for round in rounds() {
                state::set(&format!("many/{:07}", round % 1_000_000), &value);
            }
            Ok(())
        }
        Mode::HugeKey => {
            let key = "k".repeat(4 << 20);
            state::set(&key, b"huge key");
            Ok(())
        }
        Mode::BroadcastFlood => {
            let payload = format!("\"{}\"", "b".repeat((64 << 10) - 2));
            for _ in rounds() {
                owlery_plugin_sdk::broadcast(cause, "flood", &payload).map_err(refused)?;
            }
            Ok(())
        }
        Mode::Http => {
            let data = event.data_json();
            let headers = data["headers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| Some((h[0].as_str()?.to_owned(), h[1].as_str()?.to_owned())))
                .collect();
            let request = owlery_plugin_sdk::HttpRequest {
                method: "POST".into(),
                url: data["url"].as_str().unwrap_or_default().into(),
                headers,
                body: vec![b'x'; data["bodyBytes"].as_u64().unwrap_or(0) as usize],
            };
            owlery_plugin_sdk::send_http(cause, &request).map_err(refused)
        }
        Mode::PublishFlood => {
            let data = serde_json::Value::String("p".repeat((64 << 10) - 2));
            for _ in rounds() {
                owlery_plugin_sdk::publish(cause, "test.flood", &data).map_err(refused)?;
            }
            Ok(())
        }
        Mode::LogFlood => {
            let line = "o".repeat(1 << 20);
            for _ in rounds() {
                println!("{line}");
            }
            Ok(())
        }
        Mode::HostLogFlood => {
            let line = "l".repeat(1 << 20);
            for _ in rounds() {
                owlery_plugin_sdk::log(LogLevel::Info, &line);
            }
            Ok(())
        }
    }
}

impl Plugin for Misbehave {
    fn init(config: String) -> Result<(), String> {
        let config: serde_json::Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        let text = |key: &str| config.get(key).and_then(|m| m.as_str());
        match text("init") {
            None => {}
            Some("sleep") => std::thread::sleep(AN_HOUR),
            Some(other) => return Err(format!("unknown init {other:?}")),
        }
        let mode = match text("mode").unwrap_or("trap") {
            "trap" => Mode::Trap,
            "loop" => Mode::Loop,
            "alloc" => Mode::Alloc,
            "error" => Mode::Error,
            "sleep" => Mode::Sleep,
            "poll_many" => Mode::PollMany,
            "stdin" => Mode::Stdin,
            "recurse" => Mode::Recurse,
            "state_big" => Mode::StateBig,
            "state_many" => Mode::StateMany,
            "huge_key" => Mode::HugeKey,
            "broadcast_flood" => Mode::BroadcastFlood,
            "publish_flood" => Mode::PublishFlood,
            "log_flood" => Mode::LogFlood,
            "hostlog_flood" => Mode::HostLogFlood,
            "http" => Mode::Http,
            other => return Err(format!("unknown mode {other:?}")),
        };
        let query = match text("query") {
            None => QueryMode::Normal,
            Some("sleep") => QueryMode::Sleep,
            Some("loop") => QueryMode::Loop,
            Some(other) => return Err(format!("unknown query {other:?}")),
        };
        let repeat = match config.get("repeat") {
            None => None,
            Some(n) => Some(n.as_u64().ok_or_else(|| format!("repeat must be a whole number, not {n}"))?),
        };
        MODE.set(mode);
        QUERY.set(query);
        REPEAT.set(repeat);
        Ok(())
    }

    fn handle(batch: Vec<Envelope>) -> Result<(), HandleError> {
        let mut count: u64 = state::get_json("count").unwrap_or(0);
        for (index, event) in batch.iter().enumerate() {
            if event.data_json().get("poison").and_then(|p| p.as_bool()) == Some(true) {
                misbehave(index, event)?;
            }
            count += 1;
        }
        state::set_json("count", &count);
        Ok(())
    }

    fn query(_request: String) -> Result<String, String> {
        match QUERY.get() {
            QueryMode::Normal => {}
            QueryMode::Sleep => std::thread::sleep(AN_HOUR),
            QueryMode::Loop => spin(),
        }
        let count: u64 = state::get_json("count").unwrap_or(0);
        Ok(serde_json::json!({ "count": count }).to_string())
    }
}

owlery_plugin_sdk::export!(Misbehave);
