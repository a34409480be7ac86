//! What a manifest may allow a plugin to send: `[capabilities] http` URL patterns, and the
//! checks every request passes at the call, before anything is buffered: its method, its
//! URL against the patterns, its headers. The guest is told why a request is refused.
//!
//! A pattern is `scheme://host[:port]/path`: the scheme exactly (`http` or `https`); the
//! host exactly, or `*.example.com` for any name under `example.com` (not itself); the port
//! exactly, the scheme's own when left out; the path exactly, or up to a final `*` as a
//! prefix. URLs are compared as parsed (WHATWG, as browsers do): `..` segments are resolved
//! and the host is the one the request goes to, so `https://allowed@evil.example/` is
//! `evil.example`, and no text trick reaches another destination.

use axum::http::{HeaderName, HeaderValue};
use reqwest::Url;

/// Methods a plugin may use.
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];
/// The longest URL accepted.
const MAX_URL: usize = 8 * 1024;
/// Headers one request may carry.
const MAX_HEADERS: usize = 64;
/// Headers the host sets itself, or that would change how the request is framed or where
/// it goes: a plugin may not set them.
const FORBIDDEN: [&str; 11] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "idempotency-key",
    "http2-settings",
];

/// One `[capabilities] http` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlPattern {
    text: String,
    scheme: String,
    /// Lowercase; `Suffix(".example.com")` for `*.example.com`.
    host: HostPattern,
    port: u16,
    /// Exact path, or a prefix when the pattern ends with `*`.
    path: String,
    prefix: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    Suffix(String),
}

impl UrlPattern {
    /// Parse a pattern as the manifest gives it; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<UrlPattern, String> {
        let bad = |why: &str| format!("{text:?}: {why}");
        let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("a pattern is scheme://host[:port]/path"))?;
        let default_port = match scheme {
            "http" => 80,
            "https" => 443,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => return Err(bad("give a path: `/` for the root alone, `/*` for any path")),
        };
        if authority.contains('@') || path.contains(['?', '#']) {
            return Err(bad("a pattern has no user, query or fragment"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => {
                (host, port.parse::<u16>().map_err(|_| bad("the port must be a number up to 65535"))?)
            }
            _ => (authority, default_port),
        };
        let host = host.to_ascii_lowercase();
        let host = match host.strip_prefix("*.") {
            Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => HostPattern::Suffix(format!(".{suffix}")),
            _ if host.is_empty() || host.contains('*') => return Err(bad("the host is a name, or *.name")),
            _ => {
                // As the URL parser will give it (an IPv6 literal keeps its brackets).
                let parsed = Url::parse(&format!("{scheme}://{host}/")).map_err(|e| bad(&format!("host: {e}")))?;
                HostPattern::Exact(parsed.host_str().unwrap_or_default().to_owned())
            }
        };
        let (path, prefix) = match path.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => (prefix.to_owned(), true),
            None if !path.contains('*') => (path.to_owned(), false),
            _ => return Err(bad("`*` may only end the path")),
        };
        Ok(UrlPattern { text: text.to_owned(), scheme: scheme.to_owned(), host, port, path, prefix })
    }

    pub fn matches(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else { return false };
        let host_ok = match &self.host {
            HostPattern::Exact(exact) => host == exact,
            HostPattern::Suffix(suffix) => host.ends_with(suffix.as_str()),
        };
        let path_ok = if self.prefix { url.path().starts_with(&self.path) } else { url.path() == self.path };
        url.scheme() == self.scheme && host_ok && url.port_or_known_default() == Some(self.port) && path_ok
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// A request checked and normalised: the method in capitals, the URL as parsed.
#[derive(Debug)]
pub struct Checked {
    pub method: String,
    pub url: Url,
}

/// Check a request against the patterns; the error is what the guest is told.
pub fn check(
    patterns: &[UrlPattern],
    method: &str,
    url: &str,
    headers: &[(String, String)],
) -> Result<Checked, String> {
    if patterns.is_empty() {
        return Err("this plugin has no `http` capability in its manifest".into());
    }
    let method = method.to_ascii_uppercase();
    if !METHODS.contains(&method.as_str()) {
        return Err(format!("method {method:?} is not one of {}", METHODS.join(", ")));
    }
    if url.len() > MAX_URL {
        return Err(format!("the URL is longer than {MAX_URL} bytes"));
    }
    let parsed = Url::parse(url).map_err(|e| format!("not an absolute URL: {e}"))?;
    if !patterns.iter().any(|p| p.matches(&parsed)) {
        // The destination, not the whole URL: a webhook URL's path is often its secret.
        return Err(format!(
            "the manifest's [capabilities] http does not allow {}://{}{}",
            parsed.scheme(),
            parsed.host_str().unwrap_or_default(),
            parsed.port().map(|p| format!(":{p}")).unwrap_or_default()
        ));
    }
    if headers.len() > MAX_HEADERS {
        return Err(format!("more than {MAX_HEADERS} headers"));
    }
    for (name, value) in headers {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a header name"))?;
        let lower = header.as_str();
        if FORBIDDEN.contains(&lower) || lower.starts_with("proxy-") {
            return Err(format!("header {name:?} is set by the host; a plugin may not set it"));
        }
        HeaderValue::from_str(value)
            .map_err(|_| format!("the value of header {name:?} is not a valid header value"))?;
    }
    Ok(Checked { method, url: parsed })
}

/// Where a request goes, for logs, limits and errors: scheme, host and port, never the
/// path or query (where webhook URLs keep their secret).
pub fn destination(url: &Url) -> String {
    format!("{}://{}:{}", url.scheme(), url.host_str().unwrap_or_default(), url.port_or_known_default().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(patterns: &[&str], url: &str) -> bool {
        let patterns: Vec<UrlPattern> = patterns.iter().map(|p| UrlPattern::parse(p).unwrap()).collect();
        check(&patterns, "POST", url, &[]).is_ok()
    }

    #[test]
    fn patterns_match_scheme_host_port_and_path() {
        let hooks = ["https://hooks.example.com/*"];
        assert!(allowed(&hooks, "https://hooks.example.com/services/T0/B0/x"));
        assert!(allowed(&hooks, "https://HOOKS.example.com:443/a?b=c"));
        assert!(!allowed(&hooks, "http://hooks.example.com/a"), "another scheme");
        assert!(!allowed(&hooks, "https://hooks.example.com:8443/a"), "another port");
        assert!(!allowed(&hooks, "https://hooks.example.com.evil.net/a"), "a longer host");
        assert!(!allowed(&hooks, "https://hooks.example.com@evil.net/a"), "a user part is not the host");
        assert!(!allowed(&hooks, "https://evil.net/https://hooks.example.com/"));
        let local = ["http://127.0.0.1:9000/hooks/*"];
        assert!(allowed(&local, "http://127.0.0.1:9000/hooks/1"));
        assert!(!allowed(&local, "http://127.0.0.1:9000/hooks/../admin"), "dot segments are resolved first");
        assert!(!allowed(&local, "http://127.0.0.1:9000/hooks/%2e%2e/admin"), "encoded dot segments too");
        assert!(!allowed(&local, "http://127.0.0.1:9001/hooks/1"));
        assert!(allowed(&local, "http://2130706433:9000/hooks/1"), "the same address, however written");
        let wild = ["https://*.example.com/"];
        assert!(allowed(&wild, "https://a.b.example.com/"));
        assert!(!allowed(&wild, "https://example.com/"), "*.name is below the name only");
        assert!(!allowed(&wild, "https://a.example.com/x"), "an exact path");
        assert!(allowed(&["http://[::1]:9000/*"], "http://[::1]:9000/x"));
    }

    #[test]
    fn bad_patterns_are_refused_saying_why() {
        for (pattern, why) in [
            ("hooks.example.com/*", "scheme://"),
            ("ftp://h/*", "http or https"),
            ("https://h", "give a path"),
            ("https://h:99999/", "port"),
            ("https://u@h/", "no user"),
            ("https://h/a*b", "end the path"),
            ("https://*/x", "host"),
            ("https://a*.h/x", "host"),
        ] {
            let error = UrlPattern::parse(pattern).unwrap_err();
            assert!(error.contains(why), "{pattern}: {error}");
        }
    }

    #[test]
    fn methods_and_headers_are_checked() {
        let patterns = [UrlPattern::parse("http://h/*").unwrap()];
        let check = |method: &str, headers: &[(&str, &str)]| {
            let headers: Vec<(String, String)> = headers.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
            check(&patterns, method, "http://h/x", &headers).map(|c| c.method)
        };
        assert_eq!(check("post", &[("content-type", "application/json")]).unwrap(), "POST");
        assert!(check("CONNECT", &[]).unwrap_err().contains("method"));
        assert!(check("TRACE", &[]).is_err());
        for name in ["Host", "content-length", "Transfer-Encoding", "Idempotency-Key", "Proxy-Authorization"] {
            assert!(check("POST", &[(name, "x")]).unwrap_err().contains("set by the host"), "{name}");
        }
        assert!(check("POST", &[("x-a", "one\r\nHost: evil")]).unwrap_err().contains("not a valid header value"));
        assert!(check("POST", &[("bad name", "x")]).unwrap_err().contains("not a header name"));
        assert!(check("POST", &vec![("x-a", "1"); 65]).unwrap_err().contains("more than"));
        assert!(super::check(&[], "POST", "http://h/x", &[]).unwrap_err().contains("no `http` capability"));
    }

    #[test]
    fn a_refusal_names_the_destination_not_the_url() {
        let patterns = [UrlPattern::parse("http://h/*").unwrap()];
        let error = check(&patterns, "POST", "https://hooks.slack.com/services/SECRET", &[]).unwrap_err();
        assert!(error.contains("https://hooks.slack.com") && !error.contains("SECRET"), "{error}");
    }
}
