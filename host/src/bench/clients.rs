//! The load the cases put on a host: single-event HTTP publishers, paced or as fast as they
//! go, and WebSocket clients that time each broadcast they receive.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

use super::report::sorted;

/// Sends event `i` over the given client; one request per call.
pub(super) type Sender = Arc<dyn Fn(reqwest::Client, u64) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

pub(super) type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The event every publishing case sends: `data.id` is `i`, for matching broadcasts up.
pub(super) fn bench_event(i: u64) -> Value {
    json!({"eventType": "incident.created", "source": "bench", "userId": format!("user-{}", i % 50), "data": {"id": i, "severity": "LOW", "location": "site-1"}})
}

/// Post single events from `clients` concurrent connections; (latencies ms, events/s).
pub(super) async fn load(requests: usize, clients: usize, send: Sender) -> anyhow::Result<(Vec<f64>, f64)> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let send = send.clone();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut latencies = Vec::new();
            for i in 0..requests / clients {
                let t = Instant::now();
                send(http.clone(), (c * 1_000_000 + i) as u64).await?;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    Ok((sorted(all), rate))
}

/// Publishing to an Owlery host, `POST /api/events`, expecting 201.
pub(super) fn owlery_sender(base: String) -> Sender {
    Arc::new(move |http, i| {
        let url = format!("{base}/api/events");
        Box::pin(async move {
            let response = http.post(url).json(&bench_event(i)).send().await?;
            if response.status().as_u16() != 201 {
                bail!("publish answered {}", response.status());
            }
            Ok(())
        })
    })
}

/// Publish at `rate`/s for `seconds`, one event per request; returns send instants by id.
pub(super) async fn paced_publish(
    base: &str,
    rate: u32,
    seconds: f64,
    first_id: u64,
) -> anyhow::Result<HashMap<u64, Instant>> {
    let http = reqwest::Client::new();
    let total = (f64::from(rate) * seconds) as u64;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..total {
        tokio::time::sleep_until(started + interval * i as u32).await;
        let (http, url, sent) = (http.clone(), format!("{base}/api/events"), sent.clone());
        let id = first_id + i;
        tasks.push(tokio::spawn(async move {
            sent.lock().await.insert(id, Instant::now());
            let _ = http.post(url).json(&bench_event(id)).send().await;
        }));
    }
    for t in tasks {
        t.await?;
    }
    let sent = std::mem::take(&mut *sent.lock().await);
    Ok(sent)
}

/// A WebSocket client, once the host has welcomed it: from then on it gets every broadcast
/// (connected without `since`, it gets only those made after that point).
pub(super) async fn connect_ws(base: &str, query: &str) -> anyhow::Result<Ws> {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{}/ws{query}", base.replace("http://", "ws://"))).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(message))) if message.to_text().is_ok_and(|t| t.contains(r#""type":"welcome""#)) => {
                return Ok(ws);
            }
            Ok(Some(Ok(_))) => {}
            _ => bail!("the host did not welcome the WebSocket client"),
        }
    }
}

/// The `data.id` of a broadcast frame, if it is one. Found without parsing the frame: a
/// thousand clients in this process parse every broadcast, on the host's cores, and a
/// whole JSON parse each made the measuring cost more than what it measures.
pub(super) fn frame_id(message: &Message) -> Option<u64> {
    let text = message.to_text().ok()?;
    let data = text.find(r#""data":{"id":"#)? + r#""data":{"id":"#.len();
    let digits = text[data..].bytes().take_while(u8::is_ascii_digit).count();
    text[data..data + digits].parse().ok()
}

/// What a WebSocket client received until nothing came for 5 s.
pub(super) struct Received {
    /// (`data.id`, arrival) of each broadcast.
    pub(super) frames: Vec<(u64, Instant)>,
    /// The close frame's code and reason, if the host closed the connection.
    pub(super) closed: Option<String>,
}

/// Read broadcasts until the connection ends or stays quiet for 5 s.
pub(super) async fn receive(mut ws: Ws) -> Received {
    let mut received = Received { frames: Vec::new(), closed: None };
    while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        if let Some(id) = frame_id(&message) {
            received.frames.push((id, Instant::now()));
        } else if let Message::Close(frame) = message {
            received.closed = Some(frame.map_or_else(|| "closed".to_owned(), |f| format!("{} {}", f.code, f.reason)));
        }
    }
    received
}
