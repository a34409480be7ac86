//! A hostile web page and a hostile client against a default host (authentication off, on
//! loopback): nothing they send may act, and plugin names never leave the plugins directory.

use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{Host, event, shipped};

const EVIL: &str = "http://evil.example";

#[tokio::test(flavor = "multi_thread")]
async fn another_web_page_cannot_drive_a_host_without_auth() {
    let host = Host::with_plugins(&[shipped("analytics")]);
    let body = json!(event("incident.created", json!({"id": 1}))).to_string();

    // A form or a no-preflight fetch can send text/plain cross-site; never application/json.
    let plain =
        host.http.post(host.url("/api/events")).header("content-type", "text/plain").body(body.clone()).send().await;
    let plain = plain.unwrap();
    assert_eq!(plain.status(), 415);
    let answer: serde_json::Value = plain.json().await.unwrap();
    assert!(answer["error"].as_str().unwrap().contains("application/json"), "{answer}");

    // A bodyless cross-site POST, with the page's Origin, does not pause anything.
    let pause = host.http.post(host.url("/api/plugins/analytics/pause")).header("origin", EVIL).send().await.unwrap();
    assert_eq!(pause.status(), 403);
    let answer: serde_json::Value = pause.json().await.unwrap();
    assert_eq!(answer["field"], "Origin", "{answer}");
    assert_eq!(host.plugin("analytics").await["state"], "running");
    for (method, path) in [
        (reqwest::Method::POST, "/api/plugins/analytics/replay"),
        (reqwest::Method::POST, "/api/events"),
        (reqwest::Method::DELETE, "/api/plugins/analytics"),
        (reqwest::Method::POST, "/api/plugins/analytics/promote?force=true"),
    ] {
        let response = host
            .http
            .request(method.clone(), host.url(path))
            .header("origin", "null")
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{method} {path}");
    }
    // DNS rebinding: the page's own name in Host.
    let rebound = host.http.get(host.url("/api/plugins")).header("host", "evil.example:8080").send().await.unwrap();
    assert_eq!(rebound.status(), 403);
    // A page on another localhost port is foreign too; a cross-site GET without Origin
    // (an image, a no-cors fetch) says so in Sec-Fetch-Site.
    let other_port = host.http.post(host.url("/api/plugins/analytics/pause")).header("origin", "http://localhost:1");
    assert_eq!(other_port.send().await.unwrap().status(), 403);
    let image = host.http.get(host.url("/api/plugins/analytics/query")).header("sec-fetch-site", "cross-site");
    assert_eq!(image.send().await.unwrap().status(), 403);

    // A WebSocket (or Socket.IO) from that page is refused at the handshake.
    for path in ["/ws", "/socket.io/?EIO=4&transport=websocket"] {
        let mut request = format!("{}{path}", host.base.replace("http://", "ws://")).into_client_request().unwrap();
        request.headers_mut().insert("origin", EVIL.parse().unwrap());
        let refused = tokio_tungstenite::connect_async(request).await;
        assert!(refused.is_err(), "{path}: a foreign Origin must not open a socket");
    }

    // The same requests from the host's own page, or without Origin (curl), work.
    let own = host.base.clone();
    let ok = host.http.post(host.url("/api/plugins/analytics/pause")).header("origin", own).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let ok = host.http.post(host.url("/api/plugins/analytics/resume")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(host.post_events(&event("incident.created", json!({"id": 2}))).await.0, 201);
    host.caught_up("analytics").await;
    assert_eq!(host.query("analytics", "").await["total"], 1, "only the accepted event counted");
    let _client = host.ws("?rooms=incident:1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_name_never_reaches_outside_the_plugins_directory() {
    let host = Host::with_plugins(&[shipped("analytics")]);
    // The plugins directory is `dir/plugins`: put decoys beside it.
    for ext in ["wasm", "toml"] {
        std::fs::write(host.dir.path().join(format!("decoy.{ext}")), b"keep me").unwrap();
    }
    for name in ["..%2Fdecoy", "..%2fdecoy", "%2E%2E%2Fdecoy", "..%5Cdecoy", "a%2F..%2F..%2Fdecoy", "%00"] {
        for (method, path) in [
            (reqwest::Method::DELETE, format!("/api/plugins/{name}?purge=true")),
            (reqwest::Method::GET, format!("/api/plugins/{name}")),
            (reqwest::Method::POST, format!("/api/plugins/{name}/pause")),
            (reqwest::Method::DELETE, format!("/api/plugins/{name}/shadow")),
        ] {
            let response = host.http.request(method.clone(), host.url(&path)).send().await.unwrap();
            assert_eq!(response.status(), 400, "{method} {path}");
            let answer: serde_json::Value = response.json().await.unwrap();
            assert_eq!(answer["field"], "name", "{method} {path}: {answer}");
        }
    }
    for ext in ["wasm", "toml"] {
        let kept = std::fs::read(host.dir.path().join(format!("decoy.{ext}"))).unwrap();
        assert_eq!(kept, b"keep me", "decoy.{ext} is untouched");
    }
    // A component uploaded as anything but application/wasm is refused, and nothing changes.
    let wasm = std::fs::read(crate::support::guests::ANALYTICS).unwrap();
    let upload =
        host.http.put(host.url("/api/plugins/other")).header("content-type", "text/plain").body(wasm).send().await;
    assert_eq!(upload.unwrap().status(), 415);
    assert_eq!(host.get("/api/plugins/other").await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_nested_too_deep_or_with_oversized_integers_get_400_and_nothing_is_stored() {
    let host = Host::with_plugins(&[shipped("analytics")]);
    let deep =
        format!(r#"{{"eventType":"incident.created","source":"t","data":{}1{}}}"#, "[".repeat(100), "]".repeat(100));
    let (status, answer) = host.post_raw(&deep).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("nested deeper than 64"), "{answer}");
    let big = r#"{"eventType":"incident.created","source":"t","data":{"id":123456789012345678901234}}"#;
    let (status, answer) = host.post_raw(big).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("64 bits"), "{answer}");
    assert!(host.topic_records("incident-events").await.is_empty(), "nothing was appended");
    // Just inside the limits is accepted.
    let (status, answer) = host.post_events(&event("incident.created", json!({"id": u64::MAX}))).await;
    assert_eq!(status, 201, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn producers_cannot_write_into_owlerys_own_topics_or_event_types() {
    let host = Host::with_plugins(&[shipped("ws-broadcast")]);
    let mut client = host.ws("?since=-1").await;
    for topic in ["dead-letters", "owlery-fanout", "not-routed"] {
        let response = host
            .http
            .post(host.url(&format!("/api/events?topic={topic}")))
            .json(&event("incident.created", json!({"id": 1})))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{topic}");
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(answer["field"], "topic", "{answer}");
    }
    // A record shaped like a broadcast, or a dead letter, from a producer.
    for event_type in ["owlery.broadcast", "owlery.dead_letter"] {
        let forged = event(event_type, json!({"room": "all", "plugin": "ws-broadcast", "payload": {"forged": true}}));
        let (status, answer) = host.post_events(&forged).await;
        assert_eq!(status, 400, "{event_type}: {answer}");
        assert_eq!(answer["field"], "eventType", "{answer}");
    }
    assert!(host.topic_records("dead-letters").await.is_empty());
    let nothing = client.next_event(std::time::Duration::from_millis(500)).await;
    assert!(nothing.is_none(), "no client saw a forged broadcast: {nothing:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_clients_are_capped_in_number_rooms_and_message_size() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let config = "max_clients = 2\nmax_rooms_per_client = 3\nws_max_message_bytes = 1024\n";
    let host = Host::with_config(&[shipped("ws-broadcast")], config);
    let ws_url = |query: &str| format!("{}/ws{query}", host.base.replace("http://", "ws://"));

    // Too many rooms at once: refused at the handshake.
    match tokio_tungstenite::connect_async(ws_url("?rooms=a,b,c,d")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 400),
        other => panic!("four rooms must be refused, got {:?}", other.map(|_| "a connection")),
    }

    let mut first = host.ws("?rooms=a,b").await;
    // One more room is fine, two more are not (and change nothing).
    first.send_json(&json!({"subscribe": ["c"]})).await;
    assert_eq!(first.next_json(std::time::Duration::from_secs(5)).await.unwrap()["type"], "rooms");
    first.send_json(&json!({"subscribe": ["d"]})).await;
    let refused = first.next_json(std::time::Duration::from_secs(5)).await.unwrap();
    assert_eq!(refused["type"], "error", "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("at most 3 rooms"), "{refused}");

    // A third client while two are connected: 503.
    let second = host.ws("").await;
    let third = tokio_tungstenite::connect_async(ws_url("")).await;
    match third {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("a third client must be turned away, got {:?}", other.map(|_| "a connection")),
    }

    // Once one leaves, a client gets in; a message over the cap ends its connection only.
    drop(second);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut big = loop {
        match tokio_tungstenite::connect_async(ws_url("")).await {
            Ok((stream, _)) => break stream,
            Err(e) if std::time::Instant::now() > deadline => panic!("the slot was never given back: {e}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    let _ = big.send(Message::Text("x".repeat(4096).into())).await;
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while let Some(frame) = futures_util::StreamExt::next(&mut big).await {
            match frame {
                Ok(Message::Close(_)) | Err(_) => return true,
                Ok(_) => {}
            }
        }
        true
    })
    .await;
    assert_eq!(closed, Ok(true), "the oversized message ended the connection");
    first.send_json(&json!({"ping": 1})).await;
    assert_eq!(first.next_json(std::time::Duration::from_secs(5)).await.unwrap()["type"], "pong", "others go on");
    assert_eq!(host.post_events(&event("incident.created", json!({"id": 9}))).await.0, 201);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_body_gets_a_json_413_and_the_client_goes_on() {
    let host = Host::with_plugins(&[shipped("analytics")]);
    // Past axum's 2 MB default for /api/events.
    let huge = format!(r#"{{"eventType":"incident.created","source":"t","data":"{}"}}"#, "x".repeat(3 << 20));
    let (status, answer) = host.post_raw(&huge).await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer["error"].is_string(), "a JSON error: {answer}");
    // The same client's next request works (the refused connection was closed, not reused).
    assert_eq!(host.post_events(&event("incident.created", json!({"id": 1}))).await.0, 201);
}

/// The id an output got before ids were keyed: a UUID v5 of public inputs, which any
/// producer could compute and publish first.
fn public_id(name: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_producer_cannot_claim_an_output_id_in_advance() {
    let host = Host::with_plugins(&[shipped("alerts")]);
    let cause = uuid::Uuid::new_v4().to_string();
    // The producer publishes first, under the id the alert would get if ids were public.
    let squatter = json!({"eventId": public_id(&format!("owlery/alerts/{cause}/0")), "eventType": "note.added",
                          "source": "attacker", "data": {}});
    assert_eq!(host.post_events(&squatter).await.0, 201);
    let incident = json!({"eventId": cause, "eventType": "incident.created", "source": "test",
                          "data": {"id": 7, "severity": "CRITICAL"}});
    assert_eq!(host.post_events(&incident).await.0, 201);
    host.caught_up("alerts").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let alerts = host.topic_records("alert-events").await;
        let raised = alerts.iter().find(|r| r["event"]["metadata"]["causationId"] == cause.as_str());
        if let Some(raised) = raised {
            assert_eq!(raised["event"]["eventType"], "alert.raised");
            assert_ne!(raised["event"]["eventId"], squatter["eventId"]);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the alert was suppressed by the squatted id: {alerts:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
