//! noop: handles every event by doing nothing. The smallest plugin there is: a template to
//! start from, and the benchmark's measure of what dispatching a batch costs.

use owlery_plugin_sdk::{Envelope, HandleError, Plugin};

struct Noop;

impl Plugin for Noop {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn handle(batch: Vec<Envelope>) -> Result<(), HandleError> {
        std::hint::black_box(&batch);
        Ok(())
    }

    fn query(_request: String) -> Result<String, String> {
        Ok("{}".to_owned())
    }
}

owlery_plugin_sdk::export!(Noop);
