//! All generated bindings of the `owlery:plugin` world, in one place (as Spin's `world`
//! crate does), so the rest of the runtime names guest types through this module only.

wasmtime::component::bindgen!({
    world: "plugin",
    path: "../wit",
    imports: { default: async | trappable },
    exports: { default: async },
});

// `self::`: the generated `owlery` module shares its name with this crate.
pub use self::owlery::plugin::types::{Envelope as GuestEnvelope, LogLevel};
pub use self::owlery::plugin::{host, types};
