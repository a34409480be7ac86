//! Owlery: a host that reads event envelopes from a durable log, routes them to sandboxed
//! WebAssembly consumer plugins, and fans their output out to browsers over WebSocket.
//!
//! One module per concern: `envelope` (the event and its validation), `log` (the
//! `EventLog` contract and its backends), `runtime` (wasmtime), `plugins` (manifests,
//! registry, runners), `store` (plugin state, offsets, fan-out log, outbox), `fanout`
//! (WebSocket hub), `http` (axum routes), `config`, `cli`, `server` (assembly).

pub mod auth;
pub mod bench;
pub mod cli;
pub mod config;
pub mod effects;
pub mod envelope;
pub mod fanout;
pub mod http;
pub mod iggy_server;
pub mod log;
pub mod outbox;
pub mod plugins;
pub mod runtime;
pub mod server;
pub mod store;
pub mod topics;
