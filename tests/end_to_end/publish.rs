//! `POST /api/events`: validation errors name the problem and append nothing.

use serde_json::{Value, json};

use crate::support::{Host, event, shipped};

async fn total_records(host: &Host) -> usize {
    let mut total = 0;
    for topic in ["incident-events", "presence-events", "auth-events", "alert-events", "events", "dead-letters"] {
        total += host.topic_records(topic).await.len();
    }
    total
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_400_naming_the_problem_and_the_log_is_unchanged() {
    // `custom` is a topic producers may name besides the routing table's.
    let host = Host::with_config(&[], "extra_topics = [\"custom\"]\n");
    let (status, _) = host.post_events(&event("incident.created", json!({"id": 1}))).await;
    assert_eq!(status, 201);
    let before = total_records(&host).await;
    assert_eq!(before, 1);

    let cases: Vec<(&str, &str, Option<u64>, &str)> = vec![
        ("{not json", "(body)", None, "not valid JSON"),
        ("[]", "(body)", None, "empty"),
        ("42", "(body)", None, "object"),
        (r#"{"source": "x"}"#, "eventType", None, "required"),
        (r#"{"eventType": 5}"#, "eventType", None, "string"),
        (r#"{"eventType": "created"}"#, "eventType", None, "dotted"),
        (r#"{"eventType": "a.b", "eventId": "123"}"#, "eventId", None, "UUID"),
        (r#"{"eventType": "a.b", "timestamp": "tuesday"}"#, "timestamp", None, "RFC 3339"),
        (r#"{"eventType": "a.b", "userId": {"id": 1}}"#, "userId", None, "string"),
        (r#"{"eventType": "a.b", "metadata": "x"}"#, "metadata", None, "object"),
        (r#"[{"eventType": "a.b"}, {"eventType": "a.b", "source": 7}]"#, "source", Some(1), "string"),
    ];
    for (body, field, index, says) in cases {
        let (status, answer) = host.post_raw(body).await;
        assert_eq!(status, 400, "{body} → {answer}");
        assert_eq!(answer["field"], field, "{body} → {answer}");
        assert_eq!(answer["index"].as_u64(), index, "{body} → {answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message:?} should say {says:?}");
    }
    let response =
        host.http.post(host.url("/api/events?topic=no%20spaces")).json(&event("a.b", json!({}))).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(response.json::<Value>().await.unwrap()["field"], "topic");

    assert_eq!(total_records(&host).await, before, "a refused request appended something");

    // A request may name its topic; the answer gives each event's place.
    let response =
        host.http.post(host.url("/api/events?topic=custom")).json(&event("a.b", json!({}))).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["events"][0]["topic"], "custom");
    assert_eq!(body["events"][0]["offset"], 0);
    assert!(body["events"][0]["partition"].is_u64());
    let records = host.topic_records("custom").await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["event"]["eventType"], "a.b");

    let (status, answer) = host.get("/api/events/replay?topic=nope").await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = host.get("/api/events/replay").await;
    assert_eq!(status, 400);
    assert_eq!(answer["field"], "topic");
    let (status, answer) = host.get("/api/plugins/nope/query").await;
    assert_eq!(status, 404, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn analytics_state_stays_bounded_however_many_incidents_and_sources() {
    // 30,000 open incidents with long ids and 3,000 distinct sources: kept in one state
    // value, as before, they outgrow the host's 1 MiB per value and the plugin fails.
    let host = Host::with_plugins(&[shipped("analytics")]);
    let long = "incident-with-a-rather-long-identifier-".repeat(2);
    for chunk in 0..30u64 {
        let batch: Vec<Value> = (chunk * 1000..(chunk + 1) * 1000)
            .map(|n| {
                json!({"eventType": "incident.created", "source": format!("sensor-{}", n % 3000),
                       "data": {"id": format!("{long}{n}"), "severity": "HIGH"}})
            })
            .collect();
        assert_eq!(host.post_events(&json!(batch)).await.0, 201);
    }
    // Half of them resolved, and one resolved before it was created.
    let resolved: Vec<Value> = (0..15_000u64)
        .map(|n| json!({"eventType": "incident.resolved", "data": {"id": format!("{long}{n}")}}))
        .collect();
    for part in resolved.chunks(5000) {
        assert_eq!(host.post_events(&json!(part)).await.0, 201);
    }
    host.caught_up("analytics").await;
    let counts = host.query("analytics", "").await;
    assert_eq!(host.plugin("analytics").await["state"], "running", "{}", host.log_tail());
    assert_eq!(counts["total"], 45_000);
    assert_eq!(counts["openBySeverity"], json!({"HIGH": 15_000}));
    let sources = counts["bySource"].as_object().unwrap();
    assert_eq!(sources.len(), 1001, "1,000 sources and (other)");
    assert_eq!(sources.values().map(|v| v.as_u64().unwrap()).sum::<u64>(), 45_000);
}
