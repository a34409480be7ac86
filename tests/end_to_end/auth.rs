//! Tokens with scopes guard every route but /health; subscribers see only their rooms, and
//! a token that lists no rooms sees only `all`; queries need their own scope.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Host, event, shipped};

const CONFIG: &str = r#"
[auth]
enabled = true
jwt_secret = "a test secret of at least thirty-two bytes"
audience = "owlery-tests"

[[auth.tokens]]
token = "publisher-token"
scopes = ["publish"]

[[auth.tokens]]
token = "viewer-1"
scopes = ["subscribe"]
rooms = ["incident:1"]

[[auth.tokens]]
token = "no-rooms"
scopes = ["subscribe"]

[[auth.tokens]]
token = "analyst"
scopes = ["query"]

[[auth.tokens]]
token = "admin-token"
scopes = ["admin"]
"#;

async fn status(_host: &Host, request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

const SECRET: &str = "a test secret of at least thirty-two bytes";

fn jwt(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_and_scopes_guard_publish_admin_and_rooms() {
    let host = Host::with_config(&[shipped("ws-broadcast")], CONFIG);
    let url = host.url("/api/events");
    let body = event("incident.updated", json!({"id": 1}));

    let (code, answer) = status(&host, host.http.post(&url).json(&body)).await;
    assert_eq!(code, 401, "no token: {answer}");
    assert!(answer["error"].as_str().unwrap().contains("token is required"));
    assert_eq!(status(&host, host.http.post(&url).bearer_auth("wrong").json(&body)).await.0, 401);
    assert_eq!(status(&host, host.http.post(&url).bearer_auth("viewer-1").json(&body)).await.0, 403);
    assert_eq!(status(&host, host.http.get(host.url("/api/plugins")).bearer_auth("publisher-token")).await.0, 403);
    assert_eq!(status(&host, host.http.get(host.url("/api/plugins")).bearer_auth("admin-token")).await.0, 200);
    let lower = host.http.get(host.url("/api/plugins")).header("authorization", "bearer admin-token");
    assert_eq!(status(&host, lower).await.0, 200, "the scheme in any case");
    // A token in the URL is for /ws alone (browsers cannot set its headers).
    let (code, answer) = status(&host, host.http.get(host.url("/api/plugins?token=admin-token"))).await;
    assert_eq!(code, 401, "{answer}");
    assert_eq!(status(&host, host.http.get(host.url("/health"))).await.0, 200, "health needs no token");

    // HMAC-signed JWTs carry the same claims; a forged one is refused.
    let good = jwt(json!({"sub": "ci", "scopes": ["publish"], "exp": 4_102_444_800u64, "aud": "owlery-tests"}), SECRET);
    let forged = jwt(json!({"sub": "ci", "scopes": ["publish", "admin"], "exp": 4_102_444_800u64}), "guess");
    assert_eq!(status(&host, host.http.post(&url).bearer_auth(&forged).json(&body)).await.0, 401);
    // Signed with the right secret but for another audience, or for none: refused too.
    for aud in [json!("someone-else"), Value::Null] {
        let other = jwt(json!({"sub": "ci", "scopes": ["publish"], "exp": 4_102_444_800u64, "aud": aud}), SECRET);
        let (code, answer) = status(&host, host.http.post(&url).bearer_auth(&other).json(&body)).await;
        assert_eq!(code, 401, "aud {aud}: {answer}");
    }

    // Plugin queries read totals across every room: the `query` scope (or admin), not `subscribe`.
    let query = host.url("/api/plugins/ws-broadcast/query");
    assert_eq!(status(&host, host.http.get(&query).bearer_auth("viewer-1")).await.0, 403);
    assert_ne!(status(&host, host.http.get(&query).bearer_auth("analyst")).await.0, 403);
    assert_ne!(status(&host, host.http.get(&query).bearer_auth("admin-token")).await.0, 403);
    assert_eq!(status(&host, host.http.get(host.url("/api/plugins")).bearer_auth("analyst")).await.0, 403);

    // A viewer of incident:1 cannot ask for incident:2, at connect or later.
    let ws_url = |query: &str| format!("{}/ws{query}", host.base.replace("http://", "ws://"));
    let refused = tokio_tungstenite::connect_async(ws_url("?token=viewer-1&rooms=incident:2")).await;
    assert!(refused.is_err(), "joining a room the token does not allow is refused");
    assert!(tokio_tungstenite::connect_async(ws_url("?rooms=incident:1")).await.is_err(), "no token, no socket");
    // A token that names no rooms fails closed: room `all` only.
    let refused = tokio_tungstenite::connect_async(ws_url("?token=no-rooms&rooms=incident:1")).await;
    assert!(refused.is_err(), "a token without rooms may not join incident:1");
    // The same over Socket.IO: refused with an error, then disconnected.
    let mut refused_io =
        crate::socketio::raw_socket_io_client(&host, &json!({"token": "no-rooms", "rooms": ["incident:1"]})).await;
    let (_, disconnected) = crate::socketio::read_until_disconnected(&mut refused_io).await;
    assert!(disconnected, "a token without rooms may not join incident:1 over Socket.IO either");
    let mut all_only = host.ws("?token=no-rooms").await;
    all_only.send_json(&json!({"subscribe": ["incident:1"]})).await;
    assert_eq!(all_only.next_json(Duration::from_secs(10)).await.unwrap()["type"], "error");

    let mut viewer = host.ws("?token=viewer-1&rooms=incident:1").await;
    viewer.send_json(&json!({"subscribe": ["incident:2"]})).await;
    let reply = viewer.next_json(Duration::from_secs(10)).await.unwrap();
    assert_eq!(reply["type"], "error", "{reply}");

    for id in [2, 1] {
        let (code, _) =
            status(&host, host.http.post(&url).bearer_auth(&good).json(&event("incident.updated", json!({"id": id}))))
                .await;
        assert_eq!(code, 201);
    }
    let frame = viewer.next_event(Duration::from_secs(20)).await.expect("the viewer gets its room");
    assert_eq!(frame["room"], "incident:1", "incident:2 must never reach a viewer of incident:1: {frame}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sockets_close_when_their_token_expires() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let host = Host::with_config(&[shipped("ws-broadcast")], CONFIG);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims =
        json!({"sub": "short-lived", "scopes": ["subscribe"], "rooms": ["*"], "exp": now + 2, "aud": "owlery-tests"});
    let token = jwt(claims, SECRET);

    let url = format!("{}/ws?token={token}", host.base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("a valid token connects");
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("the socket is closed once its token expires");
    assert_eq!(closed, Some((4001, "token expired".to_owned())));

    let mut io = crate::socketio::raw_socket_io_client(&host, &json!({"token": token})).await;
    let (_, disconnected) = crate::socketio::read_until_disconnected(&mut io).await;
    assert!(disconnected, "a Socket.IO client is disconnected once its token expires");
}

/// `owlery serve` in an empty directory with this `owlery.toml` (if any) and these flags
/// must refuse to start, saying `expected`.
pub fn refuses_to_start(owlery_toml: Option<&str>, listen: &str, expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    if let Some(text) = owlery_toml {
        std::fs::write(dir.path().join("owlery.toml"), text).unwrap();
    }
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_owlery"))
        .args(["serve", "--listen", listen])
        .current_dir(dir.path())
        .env_remove("OWLERY_CONFIG")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(expected), "{stderr}");
}

#[test]
fn a_public_address_without_auth_is_refused() {
    refuses_to_start(None, "0.0.0.0:0", "without authentication");
}

#[test]
fn short_secrets_refuse_to_start() {
    for (toml, expected) in [
        ("[auth]\nenabled = true\njwt_secret = \"change-me\"\n", "jwt_secret must be at least 32 bytes"),
        ("cluster_secret = \"too short\"\n", "cluster_secret must be at least 32 bytes"),
        (
            "log = \"iggy\"\n[auth]\nenabled = true\n[[auth.tokens]]\ntoken = \"t\"\nscopes = [\"admin\"]\n",
            "on Iggy with [auth] on, set cluster_secret",
        ),
    ] {
        refuses_to_start(Some(toml), "127.0.0.1:0", expected);
    }
}
