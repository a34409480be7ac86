//! A thousand WebSocket clients; one never reads. It is cut off with a reason, and every
//! other client receives everything, in order.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Host, event, shipped};

const CLIENTS: usize = 1000;
const EVENTS: u64 = 1000;
const BATCH: u64 = 50;

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_is_disconnected_and_nobody_else_waits() {
    // Small buffers, so that a client that stops reading is noticed after a few hundred
    // frames rather than megabytes.
    let host = Host::with_config(&[shipped("ws-broadcast")], "client_queue = 256\nsocket_send_buffer = 16384\n");
    let ws_url = format!("{}/ws", host.base.replace("http://", "ws://"));

    // The first reader reports its progress: the publisher never runs more than a couple
    // of batches ahead of the readers, so only a client that does not read falls behind.
    let (progress_tx, progress) = tokio::sync::watch::channel(0usize);
    let mut progress_tx = Some(progress_tx);
    let mut readers = Vec::new();
    for _ in 0..CLIENTS - 1 {
        let (stream, _) = tokio_tungstenite::connect_async(&ws_url).await.expect("connects");
        let (_, mut read) = stream.split();
        let report = progress_tx.take();
        readers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while ids.len() < EVENTS as usize {
                if let Some(report) = &report {
                    let _ = report.send(ids.len());
                }
                match tokio::time::timeout(Duration::from_secs(60), read.next()).await {
                    Ok(Some(Ok(Message::Text(text)))) => {
                        let frame: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
                        if let Some(n) = frame["event"]["data"]["n"].as_u64() {
                            ids.push(n);
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    other => panic!("a reading client lost its stream after {} events: {other:?}", ids.len()),
                }
            }
            ids
        }));
    }
    // The one that never reads, with a small receive buffer of its own.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(host.base.trim_start_matches("http://").parse().unwrap()).await.unwrap();
    let (mut slow, _) = tokio_tungstenite::client_async(&ws_url, tcp).await.expect("the slow client connects");

    for chunk in 0..EVENTS / BATCH {
        let mut seen = progress.clone();
        let behind = (chunk.saturating_sub(1) * BATCH) as usize;
        tokio::time::timeout(Duration::from_secs(60), seen.wait_for(|n| *n >= behind)).await.unwrap().unwrap();
        let batch: Vec<_> = (chunk * BATCH..(chunk + 1) * BATCH)
            .map(|n| {
                // One incident: one partition, so one order.
                let mut e = event("incident.created", json!({"id": 1, "n": n}));
                e["userId"] = json!("one-reporter");
                e
            })
            .collect();
        assert_eq!(host.post_events(&json!(batch)).await.0, 201);
    }
    for reader in readers {
        let ids = reader.await.unwrap();
        assert_eq!(ids, (0..EVENTS).collect::<Vec<_>>(), "every other client gets everything, in order");
    }

    // Now the slow one reads: some frames, then the end of its connection.
    let mut frames = 0;
    let mut close_reason = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), slow.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => frames += 1,
            Ok(Some(Ok(Message::Close(frame)))) => {
                close_reason = frame.map(|f| f.reason.to_string());
                break;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => break,
            Err(_) => panic!("the slow client was never disconnected ({frames} frames)"),
        }
    }
    assert!(frames < EVENTS as usize, "the slow client was cut off early, after {frames} frames");
    if let Some(reason) = close_reason {
        assert!(reason.contains("too slow"), "{reason}");
    }
    assert!(host.log().contains("fell too far behind"), "the disconnect is logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_queue_is_bounded_in_bytes_as_well_as_frames() {
    // Room for 100,000 frames but only 64 KiB: large broadcasts fill the bytes long before
    // the frames.
    let config = "client_queue = 100000\nclient_queue_bytes = 65536\nsocket_send_buffer = 4096\n";
    let host = Host::with_config(&[shipped("ws-broadcast")], config);
    let ws_url = format!("{}/ws", host.base.replace("http://", "ws://"));
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(host.base.trim_start_matches("http://").parse().unwrap()).await.unwrap();
    let (mut slow, _) = tokio_tungstenite::client_async(&ws_url, tcp).await.expect("the slow client connects");
    let mut reader = host.ws("").await;
    // A client that reads as the broadcasts come is never cut off: the publisher waits for
    // it to have every broadcast before the next (a burst larger than the byte limit would
    // cut it off too, which is the point of the limit; with two ahead, 48 KiB of the 64 KiB
    // could be queued for it, and under a loaded full run it once was cut off).
    let (progress_tx, progress) = tokio::sync::watch::channel(0u64);
    let reading = tokio::spawn(async move {
        for n in 0..300u64 {
            let frame = reader.next_event(Duration::from_secs(60)).await.expect("a reading client gets everything");
            assert_eq!(frame["event"]["data"]["n"], n);
            let _ = progress_tx.send(n + 1);
        }
    });

    // 300 broadcasts of about 16 KiB each: about 4.8 MB, seventy times the byte limit.
    let big = "x".repeat(16 << 10);
    for n in 0..300u64 {
        let mut seen = progress.clone();
        tokio::time::timeout(Duration::from_secs(60), seen.wait_for(|read| *read >= n)).await.unwrap().unwrap();
        let mut e = event("incident.created", json!({"id": 1, "n": n, "blob": big}));
        // One incident: one partition, so one order.
        e["userId"] = json!("one-reporter");
        assert_eq!(host.post_events(&e).await.0, 201);
    }
    reading.await.unwrap();

    let mut frames = 0;
    let reason = loop {
        match tokio::time::timeout(Duration::from_secs(30), slow.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => frames += 1,
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| f.reason.to_string()),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => break None,
            Err(_) => panic!("the slow client was never disconnected ({frames} frames)"),
        }
    };
    assert!(frames < 300, "cut off by bytes, long before 100,000 frames: got {frames}");
    if let Some(reason) = reason {
        assert!(reason.contains("too slow"), "{reason}");
    }
    assert!(host.log().contains("fell too far behind"), "the disconnect is logged");
}
