//! A plugin built against another version of the contract (`owlery:plugin@0.9.0`): the host
//! must refuse it at load with both versions named, not with a linker error.

wit_bindgen::generate!({
    inline: "
        package owlery:plugin@0.9.0;
        interface host {
            log: func(message: string);
        }
        world plugin {
            import host;
            export init: func(config: string) -> result<_, string>;
            export handle: func(batch: list<string>) -> result<_, string>;
            export query: func(request: string) -> result<string, string>;
        }
    ",
});

struct Other;

impl Guest for Other {
    fn init(config: String) -> Result<(), String> {
        owlery::plugin::host::log(&config);
        Ok(())
    }

    fn handle(_batch: Vec<String>) -> Result<(), String> {
        Ok(())
    }

    fn query(_request: String) -> Result<String, String> {
        Ok("{}".into())
    }
}

export!(Other);
