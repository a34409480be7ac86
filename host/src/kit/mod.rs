//! The plugin authoring kit: `owlery plugin new` writes a ready project (Rust or
//! JavaScript, with the SDK in it) and `owlery plugin test` runs a plugin offline over a
//! file of events, in the host's runtime with its manifest's limits.

pub mod offline;
pub mod scaffold;

use std::path::PathBuf;

pub use offline::TestArgs;
pub use scaffold::Lang;

#[derive(Debug, clap::Subcommand)]
pub enum KitAction {
    /// Write a new plugin project: manifest, source with init/handle/query, sample events.
    New {
        name: String,
        #[arg(long, value_enum, default_value = "rust")]
        lang: Lang,
        /// Where [default: ./NAME]; must be missing or empty.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run a plugin offline over events from a file and print what it did for each; exits
    /// non-zero if any event was dead-lettered.
    Test(TestArgs),
}

/// Run `owlery plugin ...`. `test` needs a tokio runtime it can block on (it runs the
/// plugin as the host's runner threads do), so it is given one here.
pub fn run(action: KitAction) -> anyhow::Result<()> {
    match action {
        KitAction::New { name, lang, dir } => {
            let made = scaffold::new(&name, lang, dir.as_deref())?;
            println!("wrote {} ({lang:?})", made.dir.display());
            println!("build:  cd {} && {}", made.dir.display(), made.build);
            println!(
                "try it: owlery plugin test {} --manifest {}/{name}.toml --events {}/events.jsonl",
                made.wasm.display(),
                made.dir.display(),
                made.dir.display()
            );
            Ok(())
        }
        KitAction::Test(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            let tested = runtime.block_on(async { tokio::task::spawn_blocking(move || offline::run(&args)).await })?;
            Ok(tested?)
        }
    }
}
