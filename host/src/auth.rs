//! Who may do what: bearer tokens with scopes (`publish`, `subscribe`, `query`, `admin`)
//! and, for `subscribe`, the rooms allowed (`incident:*`). Tokens are static strings from
//! `owlery.toml` or HMAC-signed JWTs (HS256) carrying the same claims. Rooms fail closed: a
//! token that lists none may join only `all`; `rooms = ["*"]` allows every room.

use serde::Deserialize;

use crate::envelope::Pattern;

/// The room every client is in, whatever its token allows.
pub const ROOM_ALL: &str = "all";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Publish,
    Subscribe,
    /// Plugin queries (`GET /api/plugins/{name}/query`): totals across every room, so not
    /// part of `subscribe`.
    Query,
    /// `GET /metrics`, for a Prometheus server (what every plugin is doing, no event data).
    Metrics,
    Admin,
}

/// What a presented token grants.
#[derive(Debug, Clone)]
pub struct Grant {
    pub subject: String,
    /// Who it names, if anyone: a JWT's `sub` or a static token's `name` (presence events
    /// use it; a connection without one is anonymous).
    pub user: Option<String>,
    pub scopes: Vec<Scope>,
    /// Room patterns a subscriber may join besides `all`; `*` is every room.
    pub rooms: Vec<Pattern>,
    /// When it stops granting anything (a JWT's `exp`, seconds since the epoch): a socket
    /// opened with it is closed then.
    pub expires_at: Option<u64>,
}

impl Grant {
    /// Everything: what a request gets when auth is off.
    pub fn everything() -> Grant {
        Grant {
            subject: "anonymous".into(),
            user: None,
            scopes: vec![Scope::Admin],
            rooms: vec![Pattern::new("*")],
            expires_at: None,
        }
    }

    /// How long until it expires (zero if it has); `None` if it never does.
    pub fn time_left(&self) -> Option<std::time::Duration> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.expires_at.map(|at| std::time::Duration::from_secs(at).saturating_sub(now))
    }

    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }

    /// Room `all` is everyone's; others must match one of the token's patterns.
    pub fn may_join(&self, room: &str) -> bool {
        room == ROOM_ALL || self.rooms.iter().any(|p| p.matches(room))
    }
}

/// One static token in `owlery.toml`: `[[auth.tokens]] token = "...", scopes = [...], rooms = [...]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticToken {
    pub token: String,
    #[serde(default)]
    pub name: Option<String>,
    pub scopes: Vec<Scope>,
    #[serde(default)]
    pub rooms: Vec<String>,
}

/// The `[auth]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Off by default, which is allowed only on a loopback address.
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub tokens: Vec<StaticToken>,
    /// HS256 secret (32 bytes or more) for JWTs with claims `sub`, `scopes`, `rooms`, `exp`.
    #[serde(default)]
    pub jwt_secret: Option<String>,
    /// When set, a JWT must carry this `aud`.
    #[serde(default)]
    pub audience: Option<String>,
    /// When set, a JWT must carry this `iss`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// The scopes of a JWT without a `scopes` claim (the tokens an existing API already
    /// issues); none by default.
    #[serde(default)]
    pub jwt_default_scopes: Vec<Scope>,
    /// The rooms of a JWT without a `rooms` claim; none (only `all`) by default.
    #[serde(default)]
    pub jwt_default_rooms: Vec<String>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<Scope>>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    #[serde(default)]
    exp: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("a token is required (Authorization: Bearer <token>, or ?token=)")]
    Missing,
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("the token lacks the {0:?} scope")]
    Forbidden(Scope),
    #[error("the token may not join room {0:?}")]
    Room(String),
}

pub struct Auth {
    config: AuthConfig,
    jwt_key: Option<jsonwebtoken::DecodingKey>,
    validation: jsonwebtoken::Validation,
}

impl Auth {
    pub fn new(config: AuthConfig) -> Auth {
        let jwt_key = config.jwt_secret.as_ref().map(|s| jsonwebtoken::DecodingKey::from_secret(s.as_bytes()));
        // HS256 only (no `alg` switching), `exp` required, and `aud`/`iss` when configured.
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        let mut required = vec!["exp"];
        // Off unless configured: a token that carries an `aud` is then not refused for it.
        validation.validate_aud = config.audience.is_some();
        if let Some(audience) = &config.audience {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Auth { config, jwt_key, validation }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// What `token` grants; with auth off, everything.
    pub fn check(&self, token: Option<&str>) -> Result<Grant, AuthError> {
        if !self.config.enabled {
            return Ok(Grant::everything());
        }
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        // Every configured token is compared, in constant time, whatever matches: neither
        // timing nor position tells a caller how close it came.
        let mut matched = None;
        for candidate in &self.config.tokens {
            if constant_time_eq(&sha256(candidate.token.as_bytes()), &sha256(token.as_bytes())) && matched.is_none() {
                matched = Some(candidate);
            }
        }
        if let Some(found) = matched {
            return Ok(Grant {
                subject: found.name.clone().unwrap_or_else(|| "static token".into()),
                user: found.name.clone(),
                scopes: found.scopes.clone(),
                rooms: found.rooms.iter().map(Pattern::new).collect(),
                expires_at: None,
            });
        }
        let Some(key) = &self.jwt_key else { return Err(AuthError::Invalid("unknown token".into())) };
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let claims = data.claims;
        let rooms = claims.rooms.as_ref().unwrap_or(&self.config.jwt_default_rooms);
        Ok(Grant {
            subject: claims.sub.clone().unwrap_or_else(|| "jwt".into()),
            user: claims.sub.filter(|s| !s.is_empty()),
            scopes: claims.scopes.unwrap_or_else(|| self.config.jwt_default_scopes.clone()),
            rooms: rooms.iter().map(Pattern::new).collect(),
            expires_at: claims.exp,
        })
    }

    pub fn require(&self, token: Option<&str>, scope: Scope) -> Result<Grant, AuthError> {
        let grant = self.check(token)?;
        if !grant.has(scope) {
            return Err(AuthError::Forbidden(scope));
        }
        Ok(grant)
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Equal without an early exit on the first differing byte (callers compare digests, so
/// lengths are equal and say nothing).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a jwt secret of at least thirty-two bytes";

    fn auth_with(audience: Option<&str>, issuer: Option<&str>) -> Auth {
        let token = |token: &str, scopes: Vec<Scope>, rooms: &[&str]| StaticToken {
            token: token.into(),
            name: None,
            scopes,
            rooms: rooms.iter().map(|r| r.to_string()).collect(),
        };
        Auth::new(AuthConfig {
            enabled: true,
            tokens: vec![
                token("viewer-1", vec![Scope::Subscribe], &["incident:1"]),
                token("no-rooms", vec![Scope::Subscribe], &[]),
                token("every-room", vec![Scope::Subscribe], &["*"]),
            ],
            jwt_secret: Some(SECRET.into()),
            audience: audience.map(str::to_owned),
            issuer: issuer.map(str::to_owned),
            ..AuthConfig::default()
        })
    }

    fn auth() -> Auth {
        auth_with(None, None)
    }

    fn jwt(claims: serde_json::Value, secret: &[u8]) -> String {
        let key = jsonwebtoken::EncodingKey::from_secret(secret);
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    }

    #[test]
    fn static_tokens_grant_their_scopes_and_rooms() {
        let grant = auth().require(Some("viewer-1"), Scope::Subscribe).unwrap();
        assert!(grant.may_join("incident:1") && grant.may_join("all") && !grant.may_join("incident:2"));
        assert_eq!(auth().require(Some("viewer-1"), Scope::Publish).unwrap_err(), AuthError::Forbidden(Scope::Publish));
        assert_eq!(auth().require(Some("viewer-1"), Scope::Query).unwrap_err(), AuthError::Forbidden(Scope::Query));
        assert_eq!(auth().check(None).unwrap_err(), AuthError::Missing);
        assert!(matches!(auth().check(Some("nope")), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn rooms_fail_closed_unless_a_token_says_every_room() {
        let none = auth().check(Some("no-rooms")).unwrap();
        assert!(none.may_join("all") && !none.may_join("incident:1"));
        let every = auth().check(Some("every-room")).unwrap();
        assert!(every.may_join("incident:1") && every.may_join("presence"));
        assert!(Grant::everything().may_join("anything") && Grant::everything().has(Scope::Query));
    }

    #[test]
    fn signed_jwts_are_accepted_and_forgeries_are_not() {
        let claims = serde_json::json!({"sub": "ana", "scopes": ["publish"], "exp": 4_102_444_800u64});
        let good = jwt(claims.clone(), SECRET.as_bytes());
        assert_eq!(auth().require(Some(&good), Scope::Publish).unwrap().subject, "ana");
        let forged = jwt(claims, b"x");
        assert!(matches!(auth().check(Some(&forged)), Err(AuthError::Invalid(_))));
        let no_rooms = auth().check(Some(&good)).unwrap();
        assert!(!no_rooms.may_join("incident:1"), "a JWT without rooms joins only all");
        let endless = jwt(serde_json::json!({"scopes": ["publish"]}), SECRET.as_bytes());
        assert!(matches!(auth().check(Some(&endless)), Err(AuthError::Invalid(_))), "exp is required");
    }

    #[test]
    fn a_jwt_without_scopes_or_rooms_gets_the_configured_defaults_and_only_those() {
        let exp = 4_102_444_800u64;
        let plain = jwt(serde_json::json!({"sub": "u-17", "exp": exp}), SECRET.as_bytes());
        // By default such a token grants nothing.
        assert_eq!(auth().require(Some(&plain), Scope::Subscribe).unwrap_err(), AuthError::Forbidden(Scope::Subscribe));
        let mut config = auth().config;
        config.jwt_default_scopes = vec![Scope::Subscribe];
        config.jwt_default_rooms = vec!["incident:*".into()];
        let defaults = Auth::new(config);
        let grant = defaults.require(Some(&plain), Scope::Subscribe).unwrap();
        assert_eq!(grant.user.as_deref(), Some("u-17"));
        assert!(grant.may_join("incident:4") && !grant.may_join("presence"));
        assert!(!grant.has(Scope::Publish) && !grant.has(Scope::Admin));
        // A token that says its scopes and rooms gets exactly those, not the defaults.
        let own = jwt(serde_json::json!({"scopes": ["publish"], "rooms": [], "exp": exp}), SECRET.as_bytes());
        let grant = defaults.check(Some(&own)).unwrap();
        assert!(grant.has(Scope::Publish) && !grant.has(Scope::Subscribe) && !grant.may_join("incident:4"));
        assert_eq!(grant.user, None);
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let strict = auth_with(Some("owlery"), Some("https://id.example.com"));
        let exp = 4_102_444_800u64;
        let right = jwt(
            serde_json::json!({"scopes": ["publish"], "exp": exp, "aud": "owlery", "iss": "https://id.example.com"}),
            SECRET.as_bytes(),
        );
        assert!(strict.require(Some(&right), Scope::Publish).is_ok());
        for claims in [
            serde_json::json!({"scopes": ["publish"], "exp": exp, "aud": "other", "iss": "https://id.example.com"}),
            serde_json::json!({"scopes": ["publish"], "exp": exp, "aud": "owlery", "iss": "https://evil.example"}),
            serde_json::json!({"scopes": ["publish"], "exp": exp, "iss": "https://id.example.com"}),
            serde_json::json!({"scopes": ["publish"], "exp": exp, "aud": "owlery"}),
        ] {
            let token = jwt(claims.clone(), SECRET.as_bytes());
            assert!(matches!(strict.check(Some(&token)), Err(AuthError::Invalid(_))), "{claims}");
        }
        // Without the settings, a token that carries aud and iss is still accepted.
        assert!(auth().require(Some(&right), Scope::Publish).is_ok());
    }
}
