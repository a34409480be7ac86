//! Paths of the guests built by this crate's build script, for the host's tests.
include!(concat!(env!("OUT_DIR"), "/paths.rs"));
