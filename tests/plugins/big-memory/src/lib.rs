//! A test plugin that counts the events it handles (in state), like any other, but whose
//! component declares a linear memory of at least 256 MiB: a zeroed 256 MiB static sits in
//! its data section (as .bss, so the file stays small), and every event touches it so the
//! linker cannot drop it. A host whose `memory_mb` is below that must refuse it at load.

use owlery_plugin_sdk::{Envelope, HandleError, Plugin, state};

const BIG: usize = 256 << 20;

/// Counted into at a different place for each event, so every page may be written.
static mut SCRATCH: [u8; BIG] = [0; BIG];

/// Write `value` at `index % BIG` of the scratch area and read it back.
fn touch(index: usize, value: u8) -> u8 {
    #[allow(unsafe_code)]
    // SAFETY: the plugin is single-threaded and the index is in bounds; no reference to the
    // static is ever made, only raw pointer accesses.
    unsafe {
        let at = (&raw mut SCRATCH).cast::<u8>().add(index % BIG);
        at.write_volatile(value);
        at.read_volatile()
    }
}

struct BigMemory;

impl Plugin for BigMemory {
    fn init(_config: String) -> Result<(), String> {
        // The last byte: the whole area must be there.
        touch(BIG - 1, 1);
        Ok(())
    }

    fn handle(batch: Vec<Envelope>) -> Result<(), HandleError> {
        let mut count: u64 = state::get_json("count").unwrap_or(0);
        for _ in &batch {
            count += 1;
            let seen = touch((count as usize).wrapping_mul(4099 * 1024), count as u8);
            if seen != count as u8 {
                return Err(HandleError { index: None, message: "scratch memory lost a write".into() });
            }
        }
        state::set_json("count", &count);
        Ok(())
    }

    fn query(_request: String) -> Result<String, String> {
        let count: u64 = state::get_json("count").unwrap_or(0);
        Ok(serde_json::json!({ "count": count, "scratchBytes": BIG }).to_string())
    }
}

owlery_plugin_sdk::export!(BigMemory);
