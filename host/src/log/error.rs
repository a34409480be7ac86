//! The log's typed errors: `LogError` is what callers of `EventLog` see; storage and
//! availability failures keep their cause (redb, io, JSON, Iggy) instead of a string.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use iggy::prelude::IggyError;

/// The causes are boxed: they are large (an `IggyError` is 80 bytes) and rare, and every
/// `Result` of the log (and of its callers' errors) would carry their size.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log storage failed: {0}")]
    Storage(#[source] Box<StorageError>),
    #[error("log is unavailable: {0}")]
    Unavailable(#[source] Box<Unavailable>),
    #[error("no topic {0:?}")]
    NoSuchTopic(String),
    #[error("topic {topic:?} has no partition {partition}")]
    NoSuchPartition { topic: String, partition: u32 },
    /// The log refused what was sent, for a reason in the entries themselves: the same
    /// entries would be refused again.
    #[error("the log refused entries for {topic}/{partition}: {source}")]
    Refused { topic: String, partition: u32, source: Box<LogError> },
}

/// The log's own storage (local disk, or the settings it was given) failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Redb(#[from] redb::Error),
    #[error("{}: {source}", path.display())]
    Directory { path: PathBuf, source: std::io::Error },
    #[error("starting the {thread}: {source}")]
    Thread { thread: &'static str, source: std::io::Error },
    #[error(transparent)]
    Entry(#[from] serde_json::Error),
    #[error("Iggy connection settings: {0}")]
    Connection(IggyError),
    #[error("{name:?}: {source}")]
    Name { name: String, source: IggyError },
    #[error("topic {topic:?}: {reason}")]
    Topic { topic: String, reason: String },
    /// One failed commit, answered to every append that was in it.
    #[error("{0}")]
    Group(Arc<LogError>),
}

/// The log cannot answer now; the same call may succeed later.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error(transparent)]
    Iggy(#[from] IggyError),
    #[error("Iggy did not answer within {} s", .0.as_secs())]
    NoAnswer(Duration),
    /// While disconnected: the error that took the connection down.
    #[error("{0}")]
    Disconnected(String),
    #[error("not connected to Iggy yet")]
    NotConnectedYet,
    #[error("Iggy does not show {topic}/{partition} yet")]
    NotShownYet { topic: String, partition: u32 },
    #[error("the log is closing")]
    Closing,
    #[error("the {0} has stopped")]
    WriterStopped(&'static str),
}

macro_rules! from_boxed {
    ($($cause:ident => $variant:ident),*) => {$(
        impl From<$cause> for LogError {
            fn from(e: $cause) -> Self {
                LogError::$variant(Box::new(e))
            }
        }
    )*};
}
from_boxed!(StorageError => Storage, Unavailable => Unavailable);

/// redb has one error type per operation; each converts through `redb::Error`.
macro_rules! from_redb {
    ($($error:ident),*) => {$(
        impl From<redb::$error> for LogError {
            fn from(e: redb::$error) -> Self {
                StorageError::Redb(e.into()).into()
            }
        }
    )*};
}
from_redb!(Error, DatabaseError, TransactionError, TableError, StorageError, CommitError);

impl From<IggyError> for LogError {
    fn from(e: IggyError) -> Self {
        Unavailable::Iggy(e).into()
    }
}
