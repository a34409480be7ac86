//! Child processes that Owlery's end-to-end tests and `owlery bench` both run: a real Iggy
//! server ([`IggyServer`]) and real `owlery serve` hosts ([`HostProcess`]); and [`metrics`],
//! which reads figures out of a host's `GET /metrics`.
//!
//! Kept out of the `owlery` crate so that the product binary does not carry test tooling,
//! and so that the tests and the bench start hosts the same way. It does not depend on
//! `owlery`: it drives the binary through its command line and environment only.

pub mod host;
pub mod iggy;
pub mod metrics;

use std::path::PathBuf;
use std::process::ExitStatus;

pub use host::HostProcess;
pub use iggy::IggyServer;

/// Why a child process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("starting {}: {source}", binary.display())]
    Spawn { binary: PathBuf, source: std::io::Error },
    #[error("{0} is already running")]
    AlreadyRunning(&'static str),
    #[error("iggy-server exited with {status}:\n{log}")]
    IggyExited { status: ExitStatus, log: String },
    #[error("iggy-server did not start within 30 s:\n{log}")]
    IggyTimedOut { log: String },
    #[error("owlery did not start; its log:\n{log}")]
    HostDidNotStart { log: String },
}
