//! Random and mutated input against the real binary's HTTP port: property tests (proptest)
//! over every route with random methods, paths, query strings, headers and bodies, and a
//! bounded run of raw bytes on the socket. Neither may produce a 5xx, a panic or a hang,
//! and what was accepted before stays readable afterwards.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

use crate::support::{Host, event, shipped};

/// Route templates; `{}` is filled with a random plugin name.
const ROUTES: &[&str] = &[
    "/api/events",
    "/api/events/replay",
    "/api/plugins",
    "/api/plugins/{}",
    "/api/plugins/{}/pause",
    "/api/plugins/{}/resume",
    "/api/plugins/{}/replay",
    "/api/plugins/{}/shadow",
    "/api/plugins/{}/promote",
    "/api/plugins/{}/query",
    "/api/monitoring/iggy-status",
    "/health",
    "/",
    "/ws",
    "/socket.io/",
];

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("analytics".to_owned()),
        Just("ws-broadcast".to_owned()),
        Just("nobody".to_owned()),
        Just("..%2Fdecoy".to_owned()),
        Just("%2e%2e".to_owned()),
        Just("a%00b".to_owned()),
        "[a-zA-Z0-9_.%-]{0,80}",
        any::<String>().prop_map(|s| urlencode(&s)),
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (proptest::sample::select(ROUTES), name()).prop_map(|(route, name)| route.replace("{}", &name)),
        1 => "/[a-zA-Z0-9/_.%-]{0,120}",
    ]
}

fn query() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        proptest::sample::select(
            &[
                "topic",
                "fromOffset",
                "limit",
                "partition",
                "since",
                "epoch",
                "rooms",
                "token",
                "force",
                "manifest",
                "view",
                "from",
                "timestamp",
            ][..]
        )
        .prop_map(str::to_owned),
        "[a-zA-Z]{1,12}",
    ];
    let value = prop_oneof![
        proptest::sample::select(
            &[
                "",
                "0",
                "-1",
                "1",
                "18446744073709551615",
                "18446744073709551616",
                "1e309",
                "NaN",
                "true",
                "incident-events",
                "dead-letters",
                "owlery-fanout",
                "incident%3A1,all",
                "start = %22earliest%22",
            ][..]
        )
        .prop_map(str::to_owned),
        any::<String>().prop_map(|s| urlencode(&s)),
    ];
    proptest::collection::vec((key, value), 0..5).prop_map(|pairs| {
        let joined: Vec<String> = pairs.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        if joined.is_empty() { String::new() } else { format!("?{}", joined.join("&")) }
    })
}

fn content_type() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        proptest::sample::select(
            &[
                "application/json",
                "application/wasm",
                "text/plain",
                "application/json; charset=utf-8",
                "multipart/form-data; boundary=x",
                "application/x-www-form-urlencoded",
                ";;;",
            ][..]
        )
        .prop_map(|t| Some(t.to_owned())),
        "[ -~]{0,40}".prop_map(Some),
    ]
}

fn origin() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        8 => Just(None),
        1 => Just(Some("http://evil.example".to_owned())),
        1 => Just(Some("null".to_owned())),
    ]
}

/// A JSON value of random shape, with the numbers a parser finds awkward.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(".{0,10}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An event envelope with one field replaced by something random.
fn mutated_event() -> impl Strategy<Value = String> {
    let field =
        proptest::sample::select(&["eventId", "eventType", "timestamp", "source", "userId", "data", "metadata"][..]);
    (field, json_value()).prop_map(|(field, value)| {
        let mut e = event("incident.created", json!({"id": 1}));
        e[field] = value;
        e.to_string()
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        proptest::collection::vec(any::<u8>(), 0..2048),
        mutated_event().prop_map(String::into_bytes),
        proptest::collection::vec(mutated_event(), 0..20).prop_map(|v| format!("[{}]", v.join(",")).into_bytes()),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        (1usize..5000).prop_map(|depth| format!("{}1{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()),
        (0usize..40)
            .prop_map(|digits| format!(r#"{{"eventType":"a.b","data":{{"n":1{}}}}}"#, "0".repeat(digits)).into_bytes()),
    ]
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Request {
    method: reqwest::Method,
    path: String,
    query: String,
    content_type: Option<String>,
    origin: Option<String>,
    /// Other headers: Host, Authorization, Sec-Fetch-Site, Content-Length lies...
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    let header = prop_oneof![
        proptest::sample::select(&["localhost", "evil.example", "127.0.0.1:1", "[::1]", "", "a b"][..])
            .prop_map(|v| ("host".to_owned(), v.to_owned())),
        proptest::sample::select(
            &["Bearer ", "Bearer x", "Basic Zm9vOmJhcg==", "bearer", "Bearer a.b.c", "Bearer fuzz-admin"][..]
        )
        .prop_map(|v| ("authorization".to_owned(), v.to_owned())),
        proptest::sample::select(&["cross-site", "same-origin", "none", "???"][..])
            .prop_map(|v| ("sec-fetch-site".to_owned(), v.to_owned())),
        proptest::sample::select(&["websocket", "h2c", ""][..]).prop_map(|v| ("upgrade".to_owned(), v.to_owned())),
        ("x-[a-z]{1,10}", "[ -~]{0,60}"),
    ];
    proptest::collection::vec(header, 0..3)
}

fn request() -> impl Strategy<Value = Request> {
    let method = proptest::sample::select(vec![
        reqwest::Method::GET,
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
        reqwest::Method::PATCH,
        reqwest::Method::OPTIONS,
        reqwest::Method::HEAD,
    ]);
    (method, path(), query(), content_type(), origin(), headers(), body()).prop_map(
        |(method, path, query, content_type, origin, headers, body)| Request {
            method,
            path,
            query,
            content_type,
            origin,
            headers,
            body,
        },
    )
}

/// What a host must still have after the hostile input: the events accepted before it.
async fn accepted_before(host: &Host) -> Vec<String> {
    let batch: Vec<Value> = (0..20).map(|n| event("incident.created", json!({"id": n}))).collect();
    let (status, answer) = host.post_events(&json!(batch)).await;
    assert_eq!(status, 201, "{answer}");
    answer["events"].as_array().unwrap().iter().map(|e| e["eventId"].as_str().unwrap().to_owned()).collect()
}

async fn still_there(host: &Host, ids: &[String]) {
    let (status, health) = host.get("/health").await;
    assert_eq!(status, 200, "{health}");
    let stored: std::collections::HashSet<String> = host
        .topic_records("incident-events")
        .await
        .iter()
        .map(|r| r["event"]["eventId"].as_str().unwrap_or_default().to_owned())
        .collect();
    for id in ids {
        assert!(stored.contains(id), "event {id} accepted before the hostile input is gone");
    }
    let log = host.log();
    assert!(!log.contains("panicked"), "the host panicked: {}", host.log_tail());
}

/// Send `cases` random requests to `host`; every one must be answered, below 500. Returns
/// how many got each status.
fn random_requests(tokio: &tokio::runtime::Runtime, host: &Host, cases: u32) -> BTreeMap<u16, u32> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let statuses = std::sync::Mutex::new(BTreeMap::<u16, u32>::new());
    runner
        .run(&request(), |r| {
            let url = format!("{}{}{}", host.base, r.path, r.query);
            let Ok(url) = reqwest::Url::parse(&url) else { return Ok(()) };
            let mut builder = http.request(r.method.clone(), url).body(r.body.clone());
            if let Some(t) = &r.content_type {
                builder = builder.header("content-type", t);
            }
            if let Some(o) = &r.origin {
                builder = builder.header("origin", o);
            }
            for (name, value) in &r.headers {
                builder = builder.header(name, value);
            }
            let answered = tokio.block_on(async { builder.send().await.map(|response| response.status()) });
            match answered {
                Ok(status) => {
                    *statuses.lock().unwrap().entry(status.as_u16()).or_default() += 1;
                    prop_assert!(status.as_u16() < 500, "{status} for {r:?}")
                }
                Err(error) => prop_assert!(false, "no answer ({error}) for {r:?}"),
            }
            Ok(())
        })
        .unwrap();
    let statuses = statuses.into_inner().unwrap();
    eprintln!("answers to {cases} random requests: {statuses:?}");
    statuses
}

fn cases() -> u32 {
    std::env::var("OWLERY_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(1000)
}

#[test]
fn random_requests_never_get_a_5xx_a_panic_or_a_hang() {
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let host = Host::with_plugins(&[shipped("ws-broadcast"), shipped("analytics")]);
    let before = tokio.block_on(accepted_before(&host));
    let statuses = random_requests(&tokio, &host, cases());
    // Most must be refusals, some acceptances.
    assert!(statuses.keys().any(|s| (200..300).contains(s)) && statuses.keys().any(|s| (400..500).contains(s)));
    tokio.block_on(still_there(&host, &before));
}

#[test]
fn random_requests_with_auth_on_never_get_a_5xx_a_panic_or_a_hang() {
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let config = "[auth]\nenabled = true\n[[auth.tokens]]\ntoken = \"fuzz-admin\"\nscopes = [\"admin\"]\n";
    let host = Host::with_config(&[shipped("ws-broadcast"), shipped("analytics")], config);
    let statuses = random_requests(&tokio, &host, cases() / 2);
    assert!(statuses.contains_key(&401), "{statuses:?}");
    let (status, _) = tokio.block_on(host.get("/health"));
    assert_eq!(status, 200);
    assert!(!host.log().contains("panicked"), "the host panicked: {}", host.log_tail());
}

/// Bytes that are almost a request: a valid one with random bytes changed, cut or added.
fn raw_request() -> impl Strategy<Value = Vec<u8>> {
    let valid = prop_oneof![
        Just(
            "POST /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n{\"eventType\":\"incident.created\",\"source\":\"x\",\"data\":{}}"
                .to_owned()
        ),
        Just("GET /api/events/replay?topic=incident-events&fromOffset=0 HTTP/1.1\r\nHost: localhost\r\n\r\n".to_owned()),
        Just("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_owned()),
        Just("POST /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n[{\"a\"\r\n0\r\n\r\n".to_owned()),
    ];
    (valid, proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..12), 0usize..4096)
        .prop_map(|(valid, edits, cut)| {
            let mut bytes = valid.into_bytes();
            for (at, byte, kind) in edits {
                let len = bytes.len();
                let i = at.index(len.max(1));
                match kind {
                    0 if len > 0 => bytes[i.min(len - 1)] = byte,
                    1 => bytes.insert(i.min(len), byte),
                    _ if len > 0 => {
                        bytes.remove(i.min(len - 1));
                    }
                    _ => {}
                }
            }
            bytes.truncate(cut.max(1));
            bytes
        })
}

#[test]
fn raw_bytes_on_the_http_port_leave_the_host_serving_and_the_log_intact() {
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let host = Host::with_plugins(&[shipped("ws-broadcast")]);
    let before = tokio.block_on(accepted_before(&host));
    let address = host.base.trim_start_matches("http://").to_owned();
    let cases = cases();
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let heads = std::sync::Mutex::new(std::collections::BTreeMap::<String, u32>::new());
    runner
        .run(&raw_request(), |bytes| {
            let heads = &heads;
            let mut tcp = std::net::TcpStream::connect(&address).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = tcp.write_all(&bytes);
            let _ = tcp.shutdown(std::net::Shutdown::Write);
            let mut answer = Vec::new();
            // The host answers (or closes) once it has the whole input: waiting on past
            // the client's end of input would be a hang. A reset is an answer too.
            if let Err(error) = tcp.read_to_end(&mut answer) {
                let hung = matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut);
                prop_assert!(!hung, "no answer and no close in 10 s for {:?}", String::from_utf8_lossy(&bytes));
            }
            let head = String::from_utf8_lossy(&answer[..answer.len().min(12)]).into_owned();
            *heads.lock().unwrap().entry(head.trim().to_owned()).or_default() += 1;
            prop_assert!(!head.starts_with("HTTP/1.1 5"), "{head} for {:?}", String::from_utf8_lossy(&bytes));
            Ok(())
        })
        .unwrap();
    eprintln!("status lines for {cases} raw inputs: {:?}", heads.into_inner().unwrap());
    tokio.block_on(still_there(&host, &before));
}
