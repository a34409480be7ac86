//! A plugin's voice: the `log` import and its stdout/stderr, both written to tracing with
//! the plugin's name. The WASI context built here grants nothing else (no environment,
//! arguments, files, sockets).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use wasmtime_wasi::p2::{OutputStream, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

use super::LogLevel;
use crate::runtime::limits::LogBudget;

/// The `log` import.
pub(super) fn guest_log(plugin: &str, level: LogLevel, message: &str) {
    match level {
        LogLevel::Trace => tracing::trace!(plugin, "{message}"),
        LogLevel::Debug => tracing::debug!(plugin, "{message}"),
        LogLevel::Info => tracing::info!(plugin, "{message}"),
        LogLevel::Warn => tracing::warn!(plugin, "{message}"),
        LogLevel::Error => tracing::error!(plugin, "{message}"),
    }
}

/// A WASI context whose only grant is stdout/stderr, into tracing (within `budget`).
pub(super) fn guest_wasi_ctx(plugin: &Arc<str>, budget: &Arc<LogBudget>) -> WasiCtx {
    let output = |stream| GuestOutput { plugin: plugin.clone(), stream, budget: budget.clone() };
    WasiCtxBuilder::new().stdout(output("stdout")).stderr(output("stderr")).build()
}

/// Guest stdout/stderr, written to tracing line by line with the plugin's name.
#[derive(Clone)]
struct GuestOutput {
    plugin: Arc<str>,
    stream: &'static str,
    /// Shared with the `log` import: one budget per call for both.
    budget: Arc<LogBudget>,
}

impl GuestOutput {
    fn emit(&self, bytes: &[u8]) {
        if !self.budget.admit(&self.plugin, bytes.len()) {
            return;
        }
        let text = String::from_utf8_lossy(bytes);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            tracing::info!(plugin = &*self.plugin, stream = self.stream, "{line}");
        }
    }
}

impl wasmtime_wasi::cli::IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.emit(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.emit(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
