//! One writer thread that commits whatever appends have queued up in a single durable
//! transaction (group commit), then answers every waiting producer. Both backends append
//! through it: the embedded log into its records, the Iggy backend into its spool.

use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::{AppendItem, Appended, LogError, StorageError, Unavailable};

/// Requests taken into one transaction at most.
const MAX_GROUP: usize = 1024;

type Reply = oneshot::Sender<Result<Vec<Appended>, LogError>>;

/// Commits one group: every request's items in one transaction, all or nothing; answers
/// where each item landed, per request. It wakes whoever waits for new data itself, after
/// the commit and before the producers hear back.
pub(super) trait CommitGroup:
    FnMut(&[Vec<AppendItem>]) -> Result<Vec<Vec<Appended>>, LogError> + Send + 'static
{
}
impl<F: FnMut(&[Vec<AppendItem>]) -> Result<Vec<Vec<Appended>>, LogError> + Send + 'static> CommitGroup for F {}

pub(super) struct GroupCommit {
    /// What the writer is called in errors and its thread's name ("log writer").
    name: &'static str,
    /// `None` only while dropping.
    requests: Option<mpsc::Sender<(Vec<AppendItem>, Reply)>>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    pub(super) fn start(name: &'static str, commit: impl CommitGroup) -> Result<GroupCommit, LogError> {
        let (requests, queue) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("owlery-{}", name.replace(' ', "-")))
            .spawn(move || write_loop(name, &queue, commit))
            .map_err(|source| StorageError::Thread { thread: name, source })?;
        Ok(GroupCommit { name, requests: Some(requests), thread: Some(thread) })
    }

    /// Append `items` in the next group; answers once they are durable (or not written).
    pub(super) async fn append(&self, items: Vec<AppendItem>) -> Result<Vec<Appended>, LogError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let requests = self.requests.as_ref().ok_or(Unavailable::Closing)?;
        requests.send((items, reply)).map_err(|_| Unavailable::WriterStopped(self.name))?;
        answer.await.map_err(|_| Unavailable::WriterStopped(self.name))?
    }
}

impl Drop for GroupCommit {
    /// Let the writer finish what is queued and close its file, so it can be opened again.
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_loop(name: &'static str, queue: &mpsc::Receiver<(Vec<AppendItem>, Reply)>, mut commit: impl CommitGroup) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let (items, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
        match commit(&items) {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Err(e) => {
                tracing::error!(writer = name, error = %e, requests = replies.len(), "appending failed; nothing of these requests was written");
                let e = Arc::new(e);
                for reply in replies {
                    let _ = reply.send(Err(StorageError::Group(e.clone()).into()));
                }
            }
        }
    }
}
