//! End-to-end tests: the real `owlery` binary, real plugins built for wasm32-wasip2, real
//! HTTP and WebSocket clients.

mod support;

mod auth;
mod bench;
mod browser;
mod chaos;
mod containment;
mod doors;
mod durability;
mod hostile_input;
mod http_effects;
mod incident_map;
mod lifecycle;
mod misbehaving;
mod on_iggy;
mod operate;
mod plugin_kit;
mod publish;
mod resume;
mod routing;
mod slow_clients;
mod socketio;
