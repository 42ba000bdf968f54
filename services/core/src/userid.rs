//! The validated user identifier.
//!
//! A userid ends up inside Redis keys, channel names and Kafka keys, so it is validated once
//! at the edge (`^[A-Za-z0-9_-]{3,64}$`) and carried as a type that cannot hold anything else.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// A userid that matches `^[A-Za-z0-9_-]{3,64}$`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserId(String);

/// Why a string is not a valid userid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("userid must be 3 to 64 characters of A-Z, a-z, 0-9, '_' or '-'")]
pub struct InvalidUserId;

impl UserId {
    /// Validates `raw` as a userid.
    ///
    /// # Errors
    /// [`InvalidUserId`] when it is too short, too long, or holds any other character.
    pub fn parse(raw: &str) -> Result<Self, InvalidUserId> {
        let ok_len = (3..=64).contains(&raw.len());
        let ok_chars = raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok_len && ok_chars {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidUserId)
        }
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for UserId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        assert!(UserId::parse("alice").is_ok());
        assert!(UserId::parse("a_b-C9").is_ok());
        assert!(UserId::parse(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn rejects_injection_and_bad_lengths() {
        for bad in ["ab", "", "a b c", "user:1", "u*", "ü-ser", "a\r\nb", "{x}y"] {
            assert_eq!(UserId::parse(bad), Err(InvalidUserId), "{bad:?}");
        }
        assert!(UserId::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn deserialize_validates() {
        assert!(serde_json::from_str::<UserId>("\"bob\"").is_ok());
        assert!(serde_json::from_str::<UserId>("\"b:b\"").is_err());
    }

    proptest! {
        #[test]
        fn valid_ids_never_contain_separators(s in "\\PC{0,80}") {
            if let Ok(id) = UserId::parse(&s) {
                let has_separator = id.as_str().contains([':', ' ', '*', '{', '}', '\n']);
                prop_assert!(!has_separator);
                prop_assert!((3..=64).contains(&id.as_str().len()));
            }
        }
    }
}
