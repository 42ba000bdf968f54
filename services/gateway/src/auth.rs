//! Tokens: HS256 JWTs (`sub` = userid, `iat`, `exp`) signed with a secret shared by every
//! gateway, so any instance verifies any token without a Redis round trip.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use colloquy_core::UserId;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
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
    #[must_use]
    pub fn new(secret: &SecretString, ttl_secs: u64) -> Self {
        let bytes = secret.expose_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub", "iat"]);
        Self {
            encoding: EncodingKey::from_secret(bytes),
            decoding: DecodingKey::from_secret(bytes),
            validation,
            ttl_secs,
        }
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
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// Checks that `token` is ours, unexpired, and issued to `user`.
    ///
    /// # Errors
    /// The [`AuthError`] to report to the client.
    pub fn verify(&self, token: Option<&str>, user: &UserId) -> Result<(), AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data =
            decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                    _ => AuthError::Invalid,
                }
            })?;
        if data.claims.sub == user.as_str() {
            Ok(())
        } else {
            Err(AuthError::WrongUser)
        }
    }
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
        TokenService::new(&SecretString::from(secret), 60)
    }

    #[test]
    fn issued_token_verifies_for_its_user_only() {
        let s = svc("k");
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        let t = s.issue(&alice).unwrap();
        assert_eq!(s.verify(Some(&t), &alice), Ok(()));
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
    fn alg_none_is_refused() {
        // header {"alg":"none","typ":"JWT"}, payload {"sub":"alice","iat":1,"exp":9999999999}
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImlhdCI6MSwiZXhwIjo5OTk5OTk5OTk5fQ.";
        let alice = UserId::parse("alice").unwrap();
        assert_eq!(svc("k").verify(Some(none), &alice), Err(AuthError::Invalid));
    }
}
