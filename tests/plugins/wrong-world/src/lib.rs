//! A component that exports `hello` instead of the `owlery:plugin` world.

wit_bindgen::generate!({
    inline: "package test:other; world other { export hello: func() -> string; }",
});

struct Other;

impl Guest for Other {
    fn hello() -> String {
        "hello".to_owned()
    }
}

export!(Other);
