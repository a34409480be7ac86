//! The outbox forwarder: appends what plugins committed for the log (their publishes, dead
//! letters, and on a shared log their broadcasts) to the log in order, then drops it from the
//! store. A crash in between appends the same entries again with the same ids, which the log
//! accepts once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::log::EventLog;
use crate::store::Store;

/// Entries appended per round.
const ROUND: usize = 256;
/// How long to wait before trying again after a failure, or looking again unwoken.
const RETRY: Duration = Duration::from_secs(1);

/// Forward until `stop` is cancelled; `wake` is notified after each commit that adds entries.
pub async fn forward(store: Arc<Store>, log: Arc<dyn EventLog>, wake: Arc<Notify>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let pause = match round(&store, log.as_ref()).await {
            Ok(true) => continue,
            Ok(false) => tokio::select! {
                _ = wake.notified() => continue,
                _ = tokio::time::sleep(RETRY) => continue,
                _ = stop.cancelled() => return,
            },
            Err(()) => RETRY,
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// One round: `Ok(true)` when entries were forwarded, `Ok(false)` when there were none.
async fn round(store: &Store, log: &dyn EventLog) -> Result<bool, ()> {
    let entries = store.outbox_peek(ROUND).map_err(|error| tracing::error!(%error, "reading the outbox failed"))?;
    let Some(last) = entries.last().map(|(seq, _)| *seq) else { return Ok(false) };
    let items = entries.into_iter().map(|(_, item)| item).collect();
    log.append(items)
        .await
        .map_err(|error| tracing::warn!(%error, "forwarding the outbox to the log failed; retrying"))?;
    if let Err(error) = store.outbox_remove_through(last) {
        tracing::error!(%error, "clearing the outbox failed");
    }
    Ok(true)
}
