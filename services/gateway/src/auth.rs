//! Tokens: HS256 JWTs (`sub` = userid, `iat`, `exp`, `iss`, `aud`) signed with a secret shared
//! by every gateway, so any instance verifies any token without a Redis round trip; and the
//! constant-time comparison of the admin bearer token.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use colloquy_core::UserId;

/// The `iss` claim of every token a gateway issues, and the only one it accepts.
pub const ISSUER: &str = "colloquy-gateway";
/// The `aud` claim: tokens are for Colloquy's WebSocket.
pub const AUDIENCE: &str = "colloquy-ws";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
    iss: String,
    aud: String,
}

/// Why a token was refused. The message is sent as the WebSocket close reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token")]
    Invalid,
    #[error("token does not belong to this userid")]
    WrongUser,
}

/// Issues and verifies tokens.
#[derive(Clone)]
pub struct TokenService {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_secs: u64,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

impl TokenService {
    /// Signs and verifies HS256 tokens with `secret`.
    ///
    /// # Errors
    /// When `secret` is empty (no HMAC key).
    pub fn new(secret: &SecretString, ttl_secs: u64) -> Result<Self, jsonwebtoken::errors::Error> {
        let bytes = secret.expose_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub", "iat", "iss", "aud"]);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        Ok(Self {
            encoding: EncodingKey::from_secret(bytes)?,
            decoding: DecodingKey::from_secret(bytes)?,
            validation,
            ttl_secs,
        })
    }

    #[must_use]
    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    /// A token for `user`, valid for the configured lifetime.
    ///
    /// # Errors
    /// Only if signing fails, which HS256 with any key does not.
    pub fn issue(&self, user: &UserId) -> Result<String, jsonwebtoken::errors::Error> {
        let now = now_secs();
        self.issue_at(user, now, now + self.ttl_secs)
    }

    /// A token with explicit issue and expiry times (seconds since the epoch), e.g. an expired
    /// one for a test.
    ///
    /// # Errors
    /// Only if signing fails, which HS256 with any key does not.
    pub fn issue_at(
        &self,
        user: &UserId,
        iat: u64,
        exp: u64,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let claims = Claims {
            sub: user.to_string(),
            iat,
            exp,
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// Checks that `token` is ours (signature, issuer, audience), unexpired, and issued to
    /// `user`; returns its expiry (seconds since the epoch).
    ///
    /// # Errors
    /// The [`AuthError`] to report to the client.
    pub fn verify(&self, token: Option<&str>, user: &UserId) -> Result<u64, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data =
            decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                    _ => AuthError::Invalid,
                }
            })?;
        if data.claims.sub == user.as_str() {
            Ok(data.claims.exp)
        } else {
            Err(AuthError::WrongUser)
        }
    }
}

/// Whether `presented` equals `expected`, in time that depends only on their lengths (so
/// the admin token cannot be guessed byte by byte from response times).
#[must_use]
pub fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    let diff = presented
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(secret: &str) -> TokenService {
        TokenService::new(&SecretString::from(secret), 60).unwrap()
    }

    #[test]
    fn an_empty_secret_is_refused() {
        assert!(TokenService::new(&SecretString::from(""), 60).is_err());
    }

    #[test]
    fn issued_token_verifies_for_its_user_only() {
        let s = svc("k");
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        let t = s.issue(&alice).unwrap();
        let exp = s.verify(Some(&t), &alice).unwrap();
        assert!(exp >= now_secs() + 59 && exp <= now_secs() + 61, "{exp}");
        assert_eq!(s.verify(Some(&t), &bob), Err(AuthError::WrongUser));
    }

    #[test]
    fn forged_expired_and_missing_tokens_are_refused() {
        let alice = UserId::parse("alice").unwrap();
        let forged = svc("other-secret").issue(&alice).unwrap();
        assert_eq!(
            svc("k").verify(Some(&forged), &alice),
            Err(AuthError::Invalid)
        );
        let s = svc("k");
        let expired = s.issue_at(&alice, 1, 2).unwrap();
        assert_eq!(s.verify(Some(&expired), &alice), Err(AuthError::Expired));
        assert_eq!(s.verify(None, &alice), Err(AuthError::Missing));
        assert_eq!(s.verify(Some("a.b.c"), &alice), Err(AuthError::Invalid));
    }

    #[test]
    fn a_foreign_issuer_or_audience_is_refused() {
        let alice = UserId::parse("alice").unwrap();
        let key = EncodingKey::from_secret(b"k").unwrap();
        let now = now_secs();
        for (iss, aud) in [("someone-else", AUDIENCE), (ISSUER, "another-api")] {
            let claims = Claims {
                sub: "alice".into(),
                iat: now,
                exp: now + 60,
                iss: iss.into(),
                aud: aud.into(),
            };
            let token = encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
            assert_eq!(
                svc("k").verify(Some(&token), &alice),
                Err(AuthError::Invalid),
                "iss {iss}, aud {aud}"
            );
        }
        // Without the two claims at all (a token of the previous format).
        let old = serde_json::json!({"sub": "alice", "iat": now, "exp": now + 60});
        let token = encode(&Header::new(Algorithm::HS256), &old, &key).unwrap();
        assert_eq!(
            svc("k").verify(Some(&token), &alice),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"", b"s3cret"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn alg_none_is_refused() {
        // header {"alg":"none","typ":"JWT"}, payload {"sub":"alice","iat":1,"exp":9999999999}
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImlhdCI6MSwiZXhwIjo5OTk5OTk5OTk5fQ.";
        let alice = UserId::parse("alice").unwrap();
        assert_eq!(svc("k").verify(Some(none), &alice), Err(AuthError::Invalid));
    }
}
