//! Test support for the host's tests: the paths of the guests built by this crate's build
//! script, and a real Iggy server.

include!(concat!(env!("OUT_DIR"), "/paths.rs"));
