//! The `owlery` binary: parses arguments and calls the library.

use clap::Parser;
use owlery::cli::{Cli, Command};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wasmtime=warn,cranelift=warn".into()),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    match cli.command {
        Command::Serve(args) => {
            let config = args.config()?;
            let runtime = tokio::runtime::Runtime::new()?;
            Ok(runtime.block_on(async { owlery::server::run(config, owlery::server::shutdown_signal()).await })?)
        }
        #[cfg(feature = "bench")]
        Command::Bench(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(owlery::bench::run(args))
        }
        Command::Plugin(action) => owlery::kit::run(action),
        Command::Plugins(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(owlery::cli::run_plugins(args))
        }
    }
}
