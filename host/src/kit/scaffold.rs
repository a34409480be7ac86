//! `owlery plugin new NAME [--lang rust|js] [--dir DIR]`: a ready plugin project, anywhere.
//!
//! Everything a project needs is written from this binary: the SDK too (a copy with its own
//! contract), so the project builds outside this repository and against the contract of
//! the host that made it. Rust: `cargo build --release`; JavaScript: `npm install && npm
//! run build` (componentize-js).

use std::path::{Path, PathBuf};

/// The language of a new plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Js,
}

#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error(
        "{0:?} is not a plugin name: 1 to 64 lowercase letters, digits, '-' and '_', starting with a letter \
         (it names the crate or package, the .wasm and the manifest)"
    )]
    Name(String),
    #[error("{} exists and is not empty: choose another --dir", .0.display())]
    NotEmpty(PathBuf),
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// One file of a template: where it goes in the project, and its text (`{{name}}` and
/// `{{file}}` are replaced).
type File = (&'static str, &'static str);

const RUST: &[File] = &[
    ("Cargo.toml", include_str!("templates/rust/Cargo.toml.tmpl")),
    (".cargo/config.toml", include_str!("templates/rust/cargo-config.toml.tmpl")),
    ("src/lib.rs", include_str!("templates/rust/lib.rs.tmpl")),
    ("{{name}}.toml", include_str!("templates/rust/manifest.toml.tmpl")),
    ("events.jsonl", include_str!("templates/rust/events.jsonl.tmpl")),
    ("README.md", include_str!("templates/rust/README.md.tmpl")),
    (".gitignore", include_str!("templates/rust/gitignore.tmpl")),
    // The SDK, as it is in this repository (self-contained on purpose).
    ("sdk/Cargo.toml", include_str!("../../../plugins/sdk/Cargo.toml")),
    ("sdk/src/lib.rs", include_str!("../../../plugins/sdk/src/lib.rs")),
    ("sdk/wit/owlery.wit", include_str!("../../../plugins/sdk/wit/owlery.wit")),
];

const JS: &[File] = &[
    ("package.json", include_str!("../../../plugins/js/template/package.json")),
    ("src/plugin.js", include_str!("../../../plugins/js/template/src/plugin.js")),
    ("{{name}}.toml", include_str!("../../../plugins/js/template/plugin.toml")),
    ("events.jsonl", include_str!("../../../plugins/js/template/events.jsonl")),
    ("README.md", include_str!("../../../plugins/js/template/README.md")),
    (".gitignore", "node_modules/\n*.wasm\n"),
    // The versions this repository builds and tests with, pinned for the project too
    // (the template's dependencies are plugins/js's own: checked by a test).
    ("package-lock.json", JS_LOCK),
    // The JS SDK and its build script, as they are in this repository.
    ("sdk/owlery.js", include_str!("../../../plugins/js/sdk/owlery.js")),
    ("sdk/owlery.d.ts", include_str!("../../../plugins/js/sdk/owlery.d.ts")),
    ("sdk/build.mjs", include_str!("../../../plugins/js/sdk/build.mjs")),
    ("sdk/wit/owlery.wit", include_str!("../../../plugins/js/sdk/wit/owlery.wit")),
];

/// plugins/js's lock, named for the project.
const JS_LOCK: &str = include_str!("../../../plugins/js/package-lock.json");
const JS_LOCK_NAME: &str = "\"name\": \"owlery-js-plugins\"";

/// What `new` made: the directory, and the command that builds it.
pub struct Scaffolded {
    pub dir: PathBuf,
    pub build: &'static str,
    pub wasm: PathBuf,
}

/// Write a `lang` project for plugin `name` into `dir` (default `./NAME`), which must be
/// missing or empty.
pub fn new(name: &str, lang: Lang, dir: Option<&Path>) -> Result<Scaffolded, ScaffoldError> {
    check_name(name)?;
    let dir = dir.map_or_else(|| PathBuf::from(name), Path::to_owned);
    if std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(ScaffoldError::NotEmpty(dir));
    }
    // Cargo names the .wasm after the crate, with `_` for `-`.
    let file = match lang {
        Lang::Rust => name.replace('-', "_"),
        Lang::Js => name.to_owned(),
    };
    let fill = |text: &str| {
        let named = format!("\"name\": {name:?}");
        text.replace("{{name}}", name).replace("{{file}}", &file).replace(JS_LOCK_NAME, &named)
    };
    let (files, build, wasm) = match lang {
        Lang::Rust => (RUST, "cargo build --release", format!("target/wasm32-wasip2/release/{file}.wasm")),
        Lang::Js => (JS, "npm install && npm run build", format!("{file}.wasm")),
    };
    for (path, text) in files {
        let path = dir.join(fill(path));
        let write = || {
            std::fs::create_dir_all(path.parent().unwrap_or(&dir))?;
            std::fs::write(&path, fill(text))
        };
        write().map_err(|source| ScaffoldError::Write { path: path.clone(), source })?;
    }
    Ok(Scaffolded { wasm: dir.join(wasm), dir, build })
}

/// What a plugin may be called: it names files, a crate and an npm package (npm refuses
/// capitals).
fn check_name(name: &str) -> Result<(), ScaffoldError> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok { Ok(()) } else { Err(ScaffoldError::Name(name.to_owned())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_project_has_its_files_named_for_the_plugin_and_refuses_to_overwrite() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("p");
        let made = new("my-counter", Lang::Rust, Some(&dir)).unwrap();
        assert_eq!(made.wasm, dir.join("target/wasm32-wasip2/release/my_counter.wasm"));
        for file in ["Cargo.toml", "src/lib.rs", "my-counter.toml", "events.jsonl", "README.md", "sdk/wit/owlery.wit"] {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            assert!(!text.contains("{{"), "{file} still has a placeholder");
        }
        assert!(std::fs::read_to_string(dir.join("Cargo.toml")).unwrap().contains("name = \"my-counter\""));
        assert_eq!(std::fs::read_to_string(dir.join("README.md")).unwrap().lines().count(), 5);
        assert!(matches!(new("my-counter", Lang::Rust, Some(&dir)), Err(ScaffoldError::NotEmpty(_))));
        for bad in ["", "9lives", "a/b", "../x", "x y", "Counter", &"a".repeat(65)] {
            assert!(matches!(new(bad, Lang::Js, Some(&root.path().join("q"))), Err(ScaffoldError::Name(_))), "{bad}");
        }
    }

    #[test]
    fn a_javascript_project_pins_the_versions_this_repository_tests_with() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("p");
        new("greeter", Lang::Js, Some(&dir)).unwrap();
        let read = |file: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap()
        };
        let (package, lock) = (read("package.json"), read("package-lock.json"));
        assert_eq!(lock["name"], "greeter");
        assert_eq!(lock["packages"][""]["name"], "greeter");
        assert_eq!(lock["packages"][""]["devDependencies"], package["devDependencies"]);
        assert_eq!(lock["packages"][""]["version"], package["version"]);
    }

    #[test]
    fn the_sdks_carry_the_hosts_contract_word_for_word() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let contract = std::fs::read_to_string(root.join("wit/owlery.wit")).unwrap();
        for copy in ["plugins/sdk/wit/owlery.wit", "plugins/js/sdk/wit/owlery.wit"] {
            assert_eq!(
                std::fs::read_to_string(root.join(copy)).unwrap(),
                contract,
                "{copy} differs from wit/owlery.wit"
            );
        }
        let package = format!("package {};", crate::runtime::CONTRACT);
        assert!(contract.contains(&package), "the host's CONTRACT is the WIT's package");
        let sdk = std::fs::read_to_string(root.join("plugins/sdk/src/lib.rs")).unwrap();
        assert!(sdk.contains(&format!("pub const CONTRACT: &str = {:?};", crate::runtime::CONTRACT)));
        // The JS SDK names it and imports the host functions of that very version.
        let js = std::fs::read_to_string(root.join("plugins/js/sdk/owlery.js")).unwrap();
        let (package, version) = crate::runtime::CONTRACT.split_once('@').unwrap();
        assert!(js.contains(&format!("export const CONTRACT = '{}';", crate::runtime::CONTRACT)));
        assert!(
            js.contains(&format!("from '{package}/host@{version}';")),
            "owlery.js imports {package}/host@{version}"
        );
    }
}
