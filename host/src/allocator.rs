//! The host's memory allocator: mimalloc, told to hand memory back to the system as soon as it
//! is free.
//!
//! Why not glibc's malloc: a plugin's reader thread allocates every batch and its runner thread
//! frees it. Under glibc the two threads' arenas fragment differently from one run to the next,
//! and in half of one day's full benches the 1M-event replay spent twice the CPU in
//! `_int_malloc`, `_int_free` and `malloc_consolidate` (3.1-3.4 s against 2.0-2.2 s, README,
//! "Performance"). mimalloc frees a block back to the page it came from, whichever thread
//! frees it.
//!
//! Why the two settings: mimalloc's defaults keep a freed page for a second (ten for whole
//! arenas) and only give it back on a later call into the allocator, which an idle host never
//! makes; and it asks for transparent huge pages on its arenas, so one touched byte holds 2 MiB.
//! With both, an idle host with three plugins held 144-149 MB; with neither, 44 MB.
//! `no_thp` is a build feature (`Cargo.toml`); the purge delay is set by [`configure`].

use libmimalloc_sys::{mi_option_get, mi_option_set_default, mi_option_t};
pub use mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the bundled mimalloc v3 header (`mimalloc.h`, `mi_option_e`);
/// `libmimalloc-sys` names only the options v2 and v3 share. Pinned by a test below.
const PURGE_DELAY: mi_option_t = 15;

/// Gives freed memory back at once (purge delay 0 ms) unless `MIMALLOC_PURGE_DELAY` says
/// otherwise. Call first thing in `main`: the delay is read at every purge, so what was freed
/// before is only held a little longer.
#[allow(unsafe_code)]
pub fn configure() {
    // SAFETY: mimalloc's option setters only store a value in its options table; they take
    // no pointers and are safe to call from any thread at any time.
    unsafe { mi_option_set_default(PURGE_DELAY, 0) }
}

/// The purge delay in force, in milliseconds.
#[allow(unsafe_code)]
pub fn purge_delay_ms() -> std::ffi::c_long {
    // SAFETY: a read of mimalloc's options table (see `configure`).
    unsafe { mi_option_get(PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The option's number is not exported by name: if a mimalloc update renumbers it, this
    // sees another option's default (purge_delay's is 1000 ms, its neighbours' 1 and 0)
    // and `configure` must not go on setting the wrong one.
    #[test]
    fn option_15_is_the_purge_delay_and_configure_sets_it_to_zero() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return; // the environment wins over `configure`, by design
        }
        assert_eq!(purge_delay_ms(), 1000, "mimalloc's default purge delay");
        configure();
        assert_eq!(purge_delay_ms(), 0);
    }
}
