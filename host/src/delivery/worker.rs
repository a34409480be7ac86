//! Sends the requests this host took in (see `claim`): each attempt with the request's
//! deadline and its id as `Idempotency-Key`, at most `per_destination` at once to one
//! scheme://host:port (a slow receiver holds up its own requests only, and never a plugin:
//! plugins only ever wait on their commit). 2xx is delivered; 408, 429, 5xx and failures to
//! connect or answer in time are tried again after an exponential backoff with jitter, or
//! after a 429's or 503's `Retry-After`; any other status is final, and so are redirects,
//! which are never followed (a redirect could lead past the allow-list). After the policy's
//! attempts the request becomes an `owlery.delivery_failed` dead letter with the last status
//! or error. Everything is recorded in the store before the next attempt is scheduled, so a
//! crash repeats at most the attempts in flight, with the same key.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;

use super::{HttpRequest, MAX_RETRY_AFTER, allow};
use crate::keys::HostKey;
use crate::log::AppendItem;
use crate::store::{Due, Pending, Settle, Store};
use crate::topics::DELIVERY_FAILED_TYPE;

/// Attempts in flight at once, all destinations together.
const MAX_IN_FLIGHT: usize = 256;

/// How one attempt ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Delivered,
    /// Worth trying again (after `retry_after`, if the receiver said).
    Again {
        error: String,
        status: Option<u16>,
        retry_after: Option<Duration>,
    },
    /// Trying again would not help.
    Final {
        error: String,
        status: Option<u16>,
    },
    /// No longer pending (settled before a restart, say).
    Gone,
}

/// Deliver for the life of the host: what is pending at start, then what `due` brings.
/// `outbox` is woken when a dead letter is written.
pub async fn deliver(
    store: Arc<Store>,
    key: HostKey,
    outbox: Arc<Notify>,
    mut due: UnboundedReceiver<Due>,
    per_destination: usize,
) {
    let client = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // Requests go where the allow-list says, never through a proxy named by the
        // environment (`HTTPS_PROXY` would see every URL and header, and could send them on).
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("owlery/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "making the HTTP client failed; no HTTP requests will be sent");
            return;
        }
    };
    let mut queues = Queues::new(per_destination.max(1));
    let loading = store.clone();
    match tokio::task::spawn_blocking(move || loading.http_pending_due()).await {
        Ok(Ok(pending)) => {
            if !pending.is_empty() {
                tracing::info!(pending = pending.len(), "HTTP requests pending from before; sending them");
            }
            pending.into_iter().for_each(|d| queues.add(d));
        }
        Ok(Err(error)) => tracing::error!(%error, "reading the pending HTTP requests failed"),
        Err(error) => tracing::error!(%error, "reading the pending HTTP requests panicked"),
    }
    let mut running: JoinSet<(Due, Option<Pending>, Outcome)> = JoinSet::new();
    loop {
        let now = crate::envelope::now_millis();
        for one in queues.take_due(now, MAX_IN_FLIGHT.saturating_sub(running.len())) {
            let (client, store) = (client.clone(), store.clone());
            running.spawn(async move {
                // A panic inside the HTTP stack ends this attempt, not the slot it holds.
                let attempt = std::panic::AssertUnwindSafe(attempt(&client, &store, one.id)).catch_unwind().await;
                let (pending, outcome) = attempt.unwrap_or_else(|_| {
                    let error = "the attempt panicked".to_owned();
                    (None, Outcome::Again { error, status: None, retry_after: None })
                });
                (one, pending, outcome)
            });
        }
        // With every slot taken, nothing can start before an attempt ends.
        let wait = (running.len() < MAX_IN_FLIGHT)
            .then(|| queues.next_due())
            .flatten()
            .map(|at| Duration::from_millis(at.saturating_sub(now).max(1)));
        tokio::select! {
            got = due.recv() => match got {
                Some(one) => queues.add(one),
                None => return,
            },
            Some(done) = running.join_next() => {
                let Ok((one, pending, outcome)) = done else { continue };
                queues.finished(one.id, &one.destination);
                if let Some(again) = settle(&store, &key, &outbox, one, pending, outcome).await {
                    queues.add(again);
                }
            }
            _ = sleep_for(wait) => {}
        }
    }
}

async fn sleep_for(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

/// Pending requests by destination, in order of when they are due, and what is in flight.
struct Queues {
    per_destination: usize,
    waiting: HashMap<String, BTreeSet<(u64, uuid::Uuid)>>,
    in_flight: HashMap<String, usize>,
    /// Every request waiting or in flight: one taken in just as the pending table was read
    /// at start arrives twice, and is scheduled once.
    known: HashSet<uuid::Uuid>,
}

impl Queues {
    fn new(per_destination: usize) -> Queues {
        Queues { per_destination, waiting: HashMap::new(), in_flight: HashMap::new(), known: HashSet::new() }
    }

    fn add(&mut self, due: Due) {
        if self.known.insert(due.id) {
            self.waiting.entry(due.destination).or_default().insert((due.due_ms, due.id));
        }
    }

    /// Up to `room` requests due by `now`, from destinations below their limit.
    fn take_due(&mut self, now: u64, mut room: usize) -> Vec<Due> {
        let mut taken = Vec::new();
        for (destination, queue) in &mut self.waiting {
            // Only destinations with something in flight have an entry: a plugin naming a
            // new subdomain per request must not grow this map for good.
            let mut busy = self.in_flight.get(destination).copied().unwrap_or(0);
            while room > 0 && busy < self.per_destination {
                match queue.first() {
                    Some(&(due_ms, id)) if due_ms <= now => {
                        queue.pop_first();
                        busy += 1;
                        room -= 1;
                        taken.push(Due { id, due_ms, destination: destination.clone() });
                    }
                    _ => break,
                }
            }
            if busy > 0 {
                self.in_flight.insert(destination.clone(), busy);
            }
        }
        self.waiting.retain(|_, queue| !queue.is_empty());
        taken
    }

    /// When the next request of a destination with room falls due (a destination at its
    /// limit waits for an attempt to finish instead).
    fn next_due(&self) -> Option<u64> {
        self.waiting
            .iter()
            .filter(|(d, _)| self.in_flight.get(*d).copied().unwrap_or(0) < self.per_destination)
            .filter_map(|(_, queue)| queue.first().map(|(at, _)| *at))
            .min()
    }

    /// An attempt at `id` ended (it is added again if it is to be tried again).
    fn finished(&mut self, id: uuid::Uuid, destination: &str) {
        self.known.remove(&id);
        if let Some(busy) = self.in_flight.get_mut(destination) {
            *busy = busy.saturating_sub(1);
            if *busy == 0 {
                self.in_flight.remove(destination);
            }
        }
    }
}

/// One attempt at request `id`, as stored (`None` when it could not be read).
async fn attempt(client: &reqwest::Client, store: &Arc<Store>, id: uuid::Uuid) -> (Option<Pending>, Outcome) {
    let reading = store.clone();
    let error = match tokio::task::spawn_blocking(move || reading.http_pending(id)).await {
        Ok(Ok(Some(pending))) => {
            let outcome = send(client, &pending.request).await;
            return (Some(pending), outcome);
        }
        Ok(Ok(None)) => return (None, Outcome::Gone),
        Ok(Err(error)) => error.to_string(),
        Err(error) => error.to_string(),
    };
    (None, Outcome::Again { error: format!("reading it: {error}"), status: None, retry_after: None })
}

/// Send `request` once and judge the answer.
async fn send(client: &reqwest::Client, request: &HttpRequest) -> Outcome {
    let Ok(url) = reqwest::Url::parse(&request.url) else {
        return Outcome::Final { error: "its URL no longer parses".into(), status: None };
    };
    let destination = allow::destination(&url);
    let Ok(method) = reqwest::Method::from_bytes(request.method.as_bytes()) else {
        return Outcome::Final { error: format!("method {:?}", request.method), status: None };
    };
    let mut builder = client
        .request(method, url)
        .timeout(Duration::from_millis(request.policy.timeout_ms))
        .header("idempotency-key", request.id.to_string())
        .body(request.body.clone());
    for (name, value) in &request.headers {
        builder = builder.header(name, value);
    }
    let what = format!("{} {destination}", request.method);
    match builder.send().await {
        Ok(response) => judge(&what, &response),
        // Without the URL: a webhook URL's path is often its secret.
        Err(error) => {
            Outcome::Again { error: format!("{what}: {}", error.without_url()), status: None, retry_after: None }
        }
    }
}

fn judge(what: &str, response: &reqwest::Response) -> Outcome {
    let status = response.status();
    let code = status.as_u16();
    if status.is_success() {
        return Outcome::Delivered;
    }
    let error = format!("{what} answered {status}");
    match code {
        408 | 429 | 500..=599 => {
            let retry_after = (code == 429 || code == 503)
                .then(|| response.headers().get(reqwest::header::RETRY_AFTER))
                .flatten()
                .and_then(|v| v.to_str().ok())
                .and_then(retry_after);
            Outcome::Again { error, status: Some(code), retry_after }
        }
        300..=399 => Outcome::Final { error: format!("{error}; redirects are not followed"), status: Some(code) },
        _ => Outcome::Final { error, status: Some(code) },
    }
}

/// A `Retry-After` value: seconds, or an HTTP date; at most `MAX_RETRY_AFTER`.
fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            httpdate::parse_http_date(value).ok()?.duration_since(std::time::SystemTime::now()).unwrap_or_default()
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The wait before attempt `made + 1`: `backoff_ms` doubled per attempt made after the
/// first, at most `max_backoff_ms`, less a random part of up to half ("equal jitter"), so
/// that requests failing together do not all come back together.
fn backoff(policy: &super::Policy, made: u32, random: u64) -> Duration {
    let full = policy.backoff_ms.saturating_mul(1u64 << made.saturating_sub(1).min(40)).min(policy.max_backoff_ms);
    let half = full / 2;
    Duration::from_millis(full - half + random % (half + 1))
}

/// Record how an attempt ended; the request again, when it is to be tried again (also
/// when it could not be read or recorded: it is still pending as it was).
async fn settle(
    store: &Arc<Store>,
    key: &HostKey,
    outbox: &Notify,
    one: Due,
    pending: Option<Pending>,
    outcome: Outcome,
) -> Option<Due> {
    if outcome == Outcome::Gone {
        return None;
    }
    let id = one.id;
    let Some(pending) = pending else {
        if let Outcome::Again { error, .. } = &outcome {
            tracing::error!(request = %id, %error, "an HTTP attempt failed before sending; trying again in a second");
        }
        return Some(Due { due_ms: crate::envelope::now_millis() + 1_000, ..one });
    };
    let made = pending.attempts + 1;
    let policy = pending.request.policy;
    let settle = match outcome {
        Outcome::Delivered => {
            tracing::debug!(plugin = %pending.plugin, request = %id, attempts = made, "HTTP request delivered");
            crate::metrics::metrics().http_requests.with_label_values(&[&pending.plugin, "delivered"]).inc();
            Settle::Delivered
        }
        Outcome::Again { error, retry_after, .. } if made < policy.attempts => {
            let wait = retry_after.unwrap_or_else(|| backoff(&policy, made, uuid::Uuid::new_v4().as_u128() as u64));
            tracing::info!(plugin = %pending.plugin, request = %id, attempt = made, of = policy.attempts, %error, retry_in_ms = wait.as_millis() as u64, "HTTP request failed; trying again");
            crate::metrics::metrics().http_requests.with_label_values(&[&pending.plugin, "retried"]).inc();
            Settle::Retry { due_ms: crate::envelope::now_millis() + wait.as_millis() as u64, error }
        }
        Outcome::Again { error, status, .. } | Outcome::Final { error, status } => {
            tracing::error!(plugin = %pending.plugin, request = %id, attempts = made, %error, "HTTP request failed for good; written to the dead-letter topic");
            crate::metrics::metrics().http_requests.with_label_values(&[&pending.plugin, "failed"]).inc();
            let dead_letter = Box::new(dead_letter_of(key, &pending.plugin, &pending.request, &error, status, made));
            Settle::Failed { error, dead_letter }
        }
        Outcome::Gone => return None,
    };
    let again = match &settle {
        Settle::Retry { due_ms, .. } => Some(Due { due_ms: *due_ms, ..one }),
        _ => None,
    };
    let writing = store.clone();
    let error = match tokio::task::spawn_blocking(move || writing.http_settle(id, settle)).await {
        Ok(Ok(wrote_outbox)) => {
            if wrote_outbox {
                outbox.notify_one();
            }
            return again;
        }
        Ok(Err(error)) => error.to_string(),
        Err(error) => error.to_string(),
    };
    // Still pending as it was: tried again later.
    tracing::error!(%error, request = %id, "recording an HTTP attempt failed; trying again in a second");
    Some(Due { due_ms: crate::envelope::now_millis() + 1_000, id, destination: pending_destination(&pending.request) })
}

fn pending_destination(request: &HttpRequest) -> String {
    reqwest::Url::parse(&request.url).map(|u| allow::destination(&u)).unwrap_or_default()
}

/// The dead letter of a request given up on (or refused when taken in), for the claim.
pub(super) fn dead_letter(key: &HostKey, claim: &super::record::Claim, error: &str, status: Option<u16>) -> AppendItem {
    dead_letter_of(key, &claim.plugin, &claim.request, error, status, 0)
}

/// An `owlery.delivery_failed` dead letter: what was asked, of whom, and how it last failed.
/// It names the destination, not the URL, and leaves the headers out: a webhook's secret is
/// in one or the other, and the dead-letter topic is readable with `subscribe`.
fn dead_letter_of(
    key: &HostKey,
    plugin: &str,
    request: &HttpRequest,
    error: &str,
    status: Option<u16>,
    attempts: u32,
) -> AppendItem {
    let event_id = key.id(&format!("owlery/delivery-failed/{}", request.id));
    let data = serde_json::json!({
        "plugin": plugin,
        "requestId": request.id,
        "cause": request.cause,
        "method": request.method,
        "destination": pending_destination(request),
        "attempts": attempts,
        "lastStatus": status,
        "error": error,
    });
    crate::topics::dead_letter(event_id, DELIVERY_FAILED_TYPE, plugin, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Policy;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_up_to_half_taken_off() {
        let policy = Policy { backoff_ms: 1_000, max_backoff_ms: 10_000, ..Policy::default() };
        let ms = |made, random| backoff(&policy, made, random).as_millis() as u64;
        assert_eq!((ms(1, 0), ms(1, 500)), (500, 1_000));
        assert_eq!((ms(2, 0), ms(3, 0), ms(4, 0)), (1_000, 2_000, 4_000));
        assert_eq!((ms(5, 0), ms(60, u64::MAX)), (5_000, 5_000 + u64::MAX % 5_001));
        for random in [0, 1, 999, 123_456] {
            assert!((500..=1_000).contains(&ms(1, random)));
        }
    }

    #[test]
    fn retry_after_is_seconds_or_a_date_and_capped() {
        assert_eq!(retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(retry_after("99999999"), Some(MAX_RETRY_AFTER));
        let soon = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        assert!(retry_after(&soon).unwrap() > Duration::from_secs(25));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO), "a past date: now");
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn a_destination_at_its_limit_waits_and_others_go_on() {
        let mut queues = Queues::new(1);
        let due = |destination: &str, at| Due { id: uuid::Uuid::new_v4(), due_ms: at, destination: destination.into() };
        queues.add(due("a", 1));
        queues.add(due("a", 2));
        queues.add(due("b", 3));
        queues.add(due("b", 50));
        let taken = queues.take_due(10, 10);
        assert_eq!(taken.len(), 2, "one each: {taken:?}");
        assert_eq!(queues.next_due(), None, "both at their limit");
        let (a, b) = if taken[0].destination == "a" { (&taken[0], &taken[1]) } else { (&taken[1], &taken[0]) };
        queues.add(b.clone());
        assert_eq!(queues.next_due(), None, "a request in flight is not scheduled twice");
        queues.finished(b.id, "b");
        assert_eq!(queues.next_due(), Some(50));
        queues.finished(a.id, "a");
        assert_eq!(queues.next_due(), Some(2));
        assert_eq!(queues.take_due(10, 0).len(), 0, "no room left overall");
        queues.add(due("c", 1_000));
        queues.take_due(10, 10);
        assert!(!queues.in_flight.contains_key("c"), "nothing in flight to c, so no entry for it");
    }
}
