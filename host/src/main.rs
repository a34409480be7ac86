//! The `owlery` binary: parses arguments and calls the library.

use clap::Parser;
use owlery::cli::{Cli, Command};
use owlery::config::LogFormat;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

// Why mimalloc, and why configured: `owlery::allocator`.
#[global_allocator]
static GLOBAL: owlery::allocator::MiMalloc = owlery::allocator::MiMalloc;

fn main() -> anyhow::Result<()> {
    owlery::allocator::configure();
    let cli = Cli::parse();
    // `serve` reads the format from its configuration (`log_format`, `OWLERY_LOG_FORMAT`);
    // the other commands write for people.
    let (config, format) = match &cli.command {
        Command::Serve(args) => {
            let config = args.config()?;
            let format = config.log_format;
            (Some(config), format)
        }
        _ => (None, LogFormat::Text),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,wasmtime=warn,cranelift=warn".into());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init(),
    }
    match cli.command {
        Command::Serve(_) => {
            let config = config.expect("read above");
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
