//! Who may do what: bearer tokens with scopes (`publish`, `subscribe`, `admin`) and, for
//! `subscribe`, the rooms allowed (`incident:*`). Tokens are static strings from
//! `owlery.toml` or HMAC-signed JWTs (HS256) carrying the same claims.

use serde::Deserialize;

use crate::envelope::Pattern;

/// The room every client is in, whatever its token allows.
pub const ROOM_ALL: &str = "all";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Publish,
    Subscribe,
    Admin,
}

/// What a presented token grants.
#[derive(Debug, Clone)]
pub struct Grant {
    pub subject: String,
    pub scopes: Vec<Scope>,
    /// Room patterns a subscriber may join; empty means every room.
    pub rooms: Vec<Pattern>,
}

impl Grant {
    /// Everything: what a request gets when auth is off.
    pub fn everything() -> Grant {
        Grant {
            subject: "anonymous".into(),
            scopes: vec![Scope::Publish, Scope::Subscribe, Scope::Admin],
            rooms: Vec::new(),
        }
    }

    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }

    /// Room `all` is everyone's; others must match one of the token's patterns.
    pub fn may_join(&self, room: &str) -> bool {
        room == ROOM_ALL || self.rooms.is_empty() || self.rooms.iter().any(|p| p.matches(room))
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
    /// HS256 secret for JWTs with claims `sub`, `scopes`, `rooms`, `exp`.
    #[serde(default)]
    pub jwt_secret: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    scopes: Vec<Scope>,
    #[serde(default)]
    rooms: Vec<String>,
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
}

impl Auth {
    pub fn new(config: AuthConfig) -> Auth {
        let jwt_key = config.jwt_secret.as_ref().map(|s| jsonwebtoken::DecodingKey::from_secret(s.as_bytes()));
        Auth { config, jwt_key }
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
        if let Some(found) = self.config.tokens.iter().find(|t| constant_time_eq(t.token.as_bytes(), token.as_bytes()))
        {
            return Ok(Grant {
                subject: found.name.clone().unwrap_or_else(|| "static token".into()),
                scopes: found.scopes.clone(),
                rooms: found.rooms.iter().map(Pattern::new).collect(),
            });
        }
        let Some(key) = &self.jwt_key else { return Err(AuthError::Invalid("unknown token".into())) };
        let validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let claims = data.claims;
        Ok(Grant {
            subject: claims.sub.unwrap_or_else(|| "jwt".into()),
            scopes: claims.scopes,
            rooms: claims.rooms.iter().map(Pattern::new).collect(),
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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(AuthConfig {
            enabled: true,
            tokens: vec![StaticToken {
                token: "viewer-1".into(),
                name: None,
                scopes: vec![Scope::Subscribe],
                rooms: vec!["incident:1".into()],
            }],
            jwt_secret: Some("s3cret".into()),
        })
    }

    #[test]
    fn static_tokens_grant_their_scopes_and_rooms() {
        let grant = auth().require(Some("viewer-1"), Scope::Subscribe).unwrap();
        assert!(grant.may_join("incident:1") && grant.may_join("all") && !grant.may_join("incident:2"));
        assert_eq!(auth().require(Some("viewer-1"), Scope::Publish).unwrap_err(), AuthError::Forbidden(Scope::Publish));
        assert_eq!(auth().check(None).unwrap_err(), AuthError::Missing);
        assert!(matches!(auth().check(Some("nope")), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn signed_jwts_are_accepted_and_forgeries_are_not() {
        let claims = serde_json::json!({"sub": "ana", "scopes": ["publish"], "exp": 4_102_444_800u64});
        let good = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert_eq!(auth().require(Some(&good), Scope::Publish).unwrap().subject, "ana");
        let forged = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"x"),
        )
        .unwrap();
        assert!(matches!(auth().check(Some(&forged)), Err(AuthError::Invalid(_))));
    }
}
