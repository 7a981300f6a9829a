//! Values that must never be printed: tokens, keys, passwords.

use std::fmt;
use std::sync::Arc;

/// What a [`Secret`] prints as, in `Debug` and `Display`, logs and configuration dumps.
pub const REDACTED_SECRET: &str = "[redacted]";

/// A secret string. Cheap to clone (shared); `Debug` and `Display` print
/// [`REDACTED_SECRET`], so a settings struct holding one can derive `Debug` without leaking it.
/// The value itself is only reachable through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    /// The secret's value, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(REDACTED_SECRET)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(REDACTED_SECRET)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::from)
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED_SECRET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    #[allow(dead_code)]
    struct Settings {
        name: String,
        token: Option<Secret>,
    }

    #[test]
    fn a_secret_never_prints() {
        let secret = Secret::new("s3cr3t-t0ken-value");
        let settings = Settings {
            name: "admin".into(),
            token: Some(secret.clone()),
        };
        for text in [
            format!("{settings:?}"),
            format!("{settings:#?}"),
            format!("{secret}"),
            serde_json::to_string(&secret).expect("serializes"),
        ] {
            assert!(!text.contains("s3cr3t"), "{text}");
            assert!(text.contains(REDACTED_SECRET), "{text}");
        }
        assert_eq!(secret.expose(), "s3cr3t-t0ken-value");
        let parsed: Secret = serde_json::from_str("\"from-a-file\"").expect("deserializes");
        assert_eq!(parsed.expose(), "from-a-file");
    }
}
