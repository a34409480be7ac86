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
//! Why the two settings: by default mimalloc keeps a freed page committed for a second and
//! gives it back only from a later call into the allocator, which an idle host may not make
//! for a long time; and it asks for transparent huge pages on its arenas
//! (`madvise(MADV_HUGEPAGE)`), so one touched byte can hold 2 MiB. With mimalloc's defaults an
//! idle host with three plugins held 144-149 MB; with `no_thp` and a purge delay of 0, 43-46
//! MB (glibc: 48). `no_thp` is a build feature (`Cargo.toml`) and only drops that `madvise`:
//! where the system's THP mode is `always` (this machine's is `madvise`), set
//! `MIMALLOC_ALLOW_THP=0`, which mimalloc reads before `main`. The purge delay is set by
//! [`configure`].

use libmimalloc_sys::{mi_option_set_default, mi_option_t};
pub use mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the bundled mimalloc v3 header (`mimalloc.h`, `mi_option_e`),
/// which `libmimalloc-sys` does not name. Pinned by a test below.
const PURGE_DELAY: mi_option_t = 15;

/// Gives freed memory back at once (purge delay 0 ms) unless `MIMALLOC_PURGE_DELAY` says
/// otherwise (mimalloc reads its environment before `main`, and a default does not override
/// it). Call first thing in `main`, before any thread: the Rust runtime's allocations before
/// it are a few small blocks, so no freed page is waiting under the old delay.
#[allow(unsafe_code)]
pub fn configure() {
    // SAFETY: stores a value in mimalloc's options table (no pointers; 15 is in range, and
    // out-of-range options are ignored). Not thread-safe against other option calls, hence
    // first thing in `main`, before any thread exists.
    unsafe { mi_option_set_default(PURGE_DELAY, 0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The purge delay in force, in milliseconds.
    #[allow(unsafe_code)]
    fn purge_delay_ms() -> std::ffi::c_long {
        // SAFETY: a read of mimalloc's options table; only this test sets options here.
        unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
    }

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
