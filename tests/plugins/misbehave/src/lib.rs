//! A test plugin: counts the events it handles (in state), and misbehaves on an event whose
//! `data.poison` is true, as its manifest's `config.mode` says: `trap`, `loop`, `alloc`
//! or `error`. Prints each poisoned event to stdout, which the host routes to its log.

use std::cell::Cell;

use owlery_plugin_sdk::{Envelope, HandleError, Plugin, state};

#[derive(Clone, Copy)]
enum Mode {
    Trap,
    Loop,
    Alloc,
    Error,
}

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Trap) };
}

struct Misbehave;

fn misbehave(index: usize, event: &Envelope) -> Result<(), HandleError> {
    println!("misbehaving on {}", event.event_id);
    match MODE.get() {
        Mode::Trap => panic!("poisoned event {}", event.event_id),
        Mode::Loop => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Mode::Alloc => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        Mode::Error => Err(HandleError::at(index, format!("refusing poisoned event {}", event.event_id))),
    }
}

impl Plugin for Misbehave {
    fn init(config: String) -> Result<(), String> {
        let config: serde_json::Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        let mode = match config.get("mode").and_then(|m| m.as_str()).unwrap_or("trap") {
            "trap" => Mode::Trap,
            "loop" => Mode::Loop,
            "alloc" => Mode::Alloc,
            "error" => Mode::Error,
            other => return Err(format!("unknown mode {other:?}")),
        };
        MODE.set(mode);
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
        let count: u64 = state::get_json("count").unwrap_or(0);
        Ok(serde_json::json!({ "count": count }).to_string())
    }
}

owlery_plugin_sdk::export!(Misbehave);
