//! Owlery: a host that reads event envelopes from a durable log, routes them to sandboxed
//! WebAssembly consumer plugins, and fans their output out to browsers.
//!
//! The modules follow the data: `envelope` (the event, validation, routing) → `log` (the
//! `EventLog` contract; embedded and Iggy backends) → `plugins` (manifests, registry, one
//! runner per plugin) → `runtime` (wasmtime: engine, instances, host imports) → `effects`
//! (what a batch produced) → `store` (state, offsets, fan-out table, outbox, one commit per
//! batch) → `outbox` (forwards committed entries to the log) and `fanout` (hub, catch-up,
//! `/ws` and Socket.IO, the shared-log mirror). Around them: `http` (axum routes), `auth`, `keys`
//! (the host's secret: unpredictable output ids, signed fan-out records), `config`, `cli`, `server` (assembly and shutdown), `topics` (Owlery's own topic names),
//! `allocator` (the binary's memory allocator).

pub mod allocator;
pub mod auth;
// `owlery bench`: tooling, not product; only with the `bench` feature (on by default).
#[cfg(feature = "bench")]
pub mod bench;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod effects;
pub mod envelope;
pub mod fanout;
pub mod http;
pub mod keys;
pub mod kit;
pub mod log;
pub mod metrics;
pub mod outbox;
pub mod plugins;
pub mod presence;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod store;
pub mod topics;
