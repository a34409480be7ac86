//! Why a runner could not do what it was asked. The messages are what operators see: in
//! `lastError`, in dead letters and in the HTTP answers to lifecycle commands.

use super::offsets::TopicPartition;
use crate::log::LogError;
use crate::runtime::CallError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A call into the plugin trapped, or returned an error.
    #[error(transparent)]
    Call(#[from] CallError),
    /// The plugin could not be instantiated or initialised when its runner started.
    #[error("init: {0}")]
    Init(CallError),
    /// A fresh instance could not be made to handle a batch or a query.
    #[error("instantiating: {0}")]
    Instantiate(CallError),
    /// A new version did not start; the old one keeps running.
    #[error("new version not started: {0}")]
    NotStarted(CallError),
    /// The promoted shadow's version did not start; its state and offsets were taken over.
    #[error("promoted version: {0}")]
    PromotedNotStarted(CallError),
    /// `handle` returned an error, naming the event it failed on when it said which.
    #[error("handle failed{}: {message}", at_event(.at))]
    HandleFailed { at: Option<(TopicPartition, u64)>, message: String },
}

fn at_event(at: &Option<(TopicPartition, u64)>) -> String {
    at.as_ref().map_or(String::new(), |(tp, offset)| format!(" at {tp}/{offset}"))
}
