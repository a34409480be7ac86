//! One writer thread that commits whatever requests have queued up in a single durable
//! transaction (group commit), then answers every one of them. Both backends append
//! through it: the embedded log into its records (`Appends`), the Iggy backend into its
//! spool, whose acknowledgements ride in the same transactions (see `iggy::acker`).

use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use super::{AppendItem, Appended, LogError, StorageError, Unavailable};

/// Requests taken into one transaction at most.
const MAX_GROUP: usize = 1024;

type Reply = oneshot::Sender<Result<Vec<Appended>, LogError>>;

/// A producer's request: `items` appended together, answered where each landed.
pub(super) struct Append {
    pub(super) items: Vec<AppendItem>,
    pub(super) reply: Reply,
}

/// What the writer thread does with each group of requests (in arrival order): commit
/// them in one transaction and answer each. `Some(wait)` when work is left over (a write
/// that failed, to try again): the writer is then called again, with an empty group if
/// nothing came meanwhile, after `wait` at most.
pub(super) trait Writer<R>: Send + 'static {
    fn write(&mut self, name: &'static str, group: Vec<R>) -> Option<Duration>;

    /// Every sender is gone: a last chance to write what was left over.
    fn finish(&mut self, _name: &'static str) {}
}

/// Commits one group of appends: every request's items in one transaction, all or nothing;
/// answers where each item landed, per request. It wakes whoever waits for new data itself,
/// after the commit and before the producers hear back.
pub(super) trait CommitGroup:
    FnMut(&[Vec<AppendItem>]) -> Result<Vec<Vec<Appended>>, LogError> + Send + 'static
{
}
impl<F: FnMut(&[Vec<AppendItem>]) -> Result<Vec<Vec<Appended>>, LogError> + Send + 'static> CommitGroup for F {}

/// The writer of a log that takes appends only.
pub(super) struct Appends<F>(pub(super) F);

impl<F: CommitGroup> Writer<Append> for Appends<F> {
    fn write(&mut self, name: &'static str, group: Vec<Append>) -> Option<Duration> {
        let (items, replies): (Vec<_>, Vec<_>) = group.into_iter().map(|a| (a.items, a.reply)).unzip();
        answer(name, replies, (self.0)(&items));
        None
    }
}

/// Answer each append with where its items landed, or all of them with the group's error.
pub(super) fn answer(name: &'static str, replies: Vec<Reply>, result: Result<Vec<Vec<Appended>>, LogError>) {
    match result {
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

pub(super) struct GroupCommit<R = Append> {
    /// What the writer is called in errors and its thread's name ("log writer").
    name: &'static str,
    /// `None` only while dropping.
    requests: Option<mpsc::Sender<R>>,
    thread: Option<JoinHandle<()>>,
}

impl<R: Send + 'static> GroupCommit<R> {
    pub(super) fn start(name: &'static str, writer: impl Writer<R>) -> Result<GroupCommit<R>, LogError> {
        let (requests, queue) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("owlery-{}", name.replace(' ', "-")))
            .spawn(move || write_loop(name, &queue, writer))
            .map_err(|source| StorageError::Thread { thread: name, source })?;
        Ok(GroupCommit { name, requests: Some(requests), thread: Some(thread) })
    }

    /// Queue `request` for the next group.
    pub(super) fn send(&self, request: R) -> Result<(), LogError> {
        self.try_send(request).map_err(|_| match self.requests {
            None => Unavailable::Closing.into(),
            Some(_) => Unavailable::WriterStopped(self.name).into(),
        })
    }

    /// Queue `request`, or have it back when the writer is gone.
    pub(super) fn try_send(&self, request: R) -> Result<(), R> {
        match &self.requests {
            Some(requests) => requests.send(request).map_err(|mpsc::SendError(request)| request),
            None => Err(request),
        }
    }

    /// Append `items` in the next group; answers once they are durable (or not written).
    pub(super) async fn append(&self, items: Vec<AppendItem>) -> Result<Vec<Appended>, LogError>
    where
        R: From<Append>,
    {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.send(Append { items, reply }.into())?;
        answer.await.map_err(|_| Unavailable::WriterStopped(self.name))?
    }
}

impl<R> Drop for GroupCommit<R> {
    /// Let the writer finish what is queued and close its file, so it can be opened again.
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_loop<R>(name: &'static str, queue: &mpsc::Receiver<R>, mut writer: impl Writer<R>) {
    let mut left_over: Option<Duration> = None;
    loop {
        let first = match left_over {
            None => match queue.recv() {
                Ok(request) => Some(request),
                Err(mpsc::RecvError) => return,
            },
            Some(wait) => match queue.recv_timeout(wait) {
                Ok(request) => Some(request),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return writer.finish(name),
            },
        };
        let mut group: Vec<R> = first.into_iter().collect();
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        left_over = writer.write(name, group);
    }
}
