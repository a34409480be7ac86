//! Who may ask what: the bearer token a request presents and the scope a route needs; and,
//! whatever the token, the checks that keep other web pages and bad names out.

use std::net::IpAddr;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::auth::Scope;

/// The bearer token of a request: `Authorization: Bearer T` (the scheme in any case, as
/// RFC 9110 has it), else, on `/ws` only (`in_query`), `?token=T`: browsers cannot set
/// headers on a WebSocket, and everywhere else a token in a URL would only end up in
/// proxies' logs and browser history.
fn presented_token(request: &axum::extract::Request, in_query: bool) -> Option<String> {
    if let Some(value) = request.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, token) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned());
    }
    if !in_query {
        return None;
    }
    let axum::extract::Query(pairs) =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(request.uri()).ok()?;
    pairs.into_iter().find(|(key, _)| key == "token").map(|(_, value)| value)
}

/// Refuse the request unless its token grants `scope` (401 without a valid token, 403
/// without the scope); the grant goes on to the handler.
pub(super) async fn require(
    State(state): State<AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
    scope: Scope,
) -> Response {
    // `subscribe` is the scope of `/ws` alone (Socket.IO reads its token from its own
    // handshake).
    let token = presented_token(&request, scope == Scope::Subscribe);
    match state.auth.require(token.as_deref(), scope) {
        Ok(grant) => {
            request.extensions_mut().insert(grant);
            next.run(request).await
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// With authentication off (loopback only), another web page the operator visits must not
/// drive the host: a `Host` that is not a loopback name (DNS rebinding) and an `Origin` that
/// is not one (a cross-site form, fetch or WebSocket) are refused, on every route including
/// `/ws` and Socket.IO. Requests without `Origin` (curl, the CLI, other servers) pass. With
/// authentication on, tokens decide.
pub(super) async fn same_site(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !state.auth.enabled()
        && let Err(refused) = loopback_only(request.headers())
    {
        return refused.into_response();
    }
    next.run(request).await
}

fn loopback_only(headers: &HeaderMap) -> Result<(), ApiError> {
    let text = |name| headers.get(name).map(|v| v.to_str().unwrap_or("(not text)"));
    let host = text(header::HOST);
    if let Some(host) = host
        && !is_loopback_host(host)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("Host {host:?} is not a loopback name; without [auth] this host answers only to localhost"),
        )
        .with("field", "Host"));
    }
    // A page's own origin is this host exactly (scheme aside); any other page, even on
    // another localhost port, is foreign.
    if let Some(origin) = text(header::ORIGIN) {
        let authority = origin.split_once("://").map(|(_, rest)| rest);
        if authority.is_none() || authority != host {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("requests from the web page at {origin:?} are refused: without [auth] only this host's own pages may call it"),
            )
            .with("field", "Origin"));
        }
    }
    // Browsers send no Origin on some cross-site GETs (images, no-cors fetches), but do
    // say where a request comes from.
    if text(HeaderName::from_static("sec-fetch-site")) == Some("cross-site") {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "cross-site requests are refused without [auth]")
            .with("field", "Sec-Fetch-Site"));
    }
    Ok(())
}

/// `localhost`, `*.localhost`, `127.x.x.x` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']').map_or(bracketed, |(inside, _)| inside),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuse a body whose `Content-Type` is not `expected` (parameters such as `charset` are
/// fine): 415. A page can send `text/plain` cross-site without asking; never `application/json`.
pub(super) fn content_type(headers: &HeaderMap, expected: &str) -> Result<(), ApiError> {
    let given = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = given.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case(expected) {
        return Ok(());
    }
    let given = if given.is_empty() { "none".to_owned() } else { format!("{given:?}") };
    Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("Content-Type must be {expected} (was {given})"))
        .with("field", "Content-Type"))
}

/// A `.wasm` request body: `Content-Type: application/wasm` (415 otherwise), within
/// `max_upload_mb` (413 beyond it, as JSON).
pub(super) struct WasmBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for WasmBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let headers = request.headers().clone();
        // Read (up to the cap) before refusing: a refusal that leaves the body unread makes
        // the connection unusable for the client's next request.
        let body = Bytes::from_request(request, state).await.map_err(|r| super::error::unreadable_body(r, "wasm"))?;
        content_type(&headers, "application/wasm")?;
        Ok(WasmBody(body))
    }
}

/// A plugin name from the path, checked before anything uses it: names are file stems in
/// the plugins directory, so `../x` must never reach a file operation.
pub(super) struct PluginName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PluginName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()).with("field", "name"))?;
        crate::plugins::check_name(&name).map_err(|e| ApiError::bad_request(e.to_string()).with("field", "name"))?;
        Ok(PluginName(name))
    }
}

#[cfg(test)]
mod tests {
    use super::is_loopback_host;

    #[test]
    fn only_loopback_names_are_loopback() {
        for host in ["localhost", "localhost:8080", "127.0.0.1:1", "127.9.9.9", "[::1]:8080", "[::1]", "app.localhost"]
        {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in ["evil.com", "evil.com:8080", "127.0.0.1.evil.com", "localhost.evil.com", "[::2]:80", "0.0.0.0", ""]
        {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
