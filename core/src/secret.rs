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

/// A value of the wrong type is refused without quoting it (serde's own message would).
impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        String::deserialize(deserializer)
            .map(Self::from)
            .map_err(|_| D::Error::custom("expected a string (a secret's value is never shown)"))
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED_SECRET)
    }
}

/// `text` with the user information of every URL in it (`scheme://user:password@host`)
/// replaced by [`REDACTED_SECRET`], for messages that quote a URL someone typed. A URL's extent
/// is taken generously (up to whitespace or a quote), so a password with an unescaped `/`, `?`
/// or `#` in it is still covered; an `@` further on in a path may make it cut more than needed.
pub fn redact_url_credentials(text: &str) -> String {
    let mut redacted = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let authority_start = scheme_end + 3;
        redacted.push_str(&rest[..authority_start]);
        let after = &rest[authority_start..];
        let extent = after
            .find(|character: char| {
                character.is_whitespace() || matches!(character, '"' | '\'' | '`' | '<' | '>')
            })
            .unwrap_or(after.len());
        match after[..extent].rfind('@') {
            Some(at) => {
                redacted.push_str(REDACTED_SECRET);
                redacted.push_str(&after[at..extent]);
            }
            None => redacted.push_str(&after[..extent]),
        }
        rest = &after[extent..];
    }
    redacted.push_str(rest);
    redacted
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

    #[test]
    fn a_secret_of_the_wrong_type_is_not_quoted() {
        let error = serde_json::from_str::<Secret>("918273645").expect_err("not a string");
        let text = error.to_string();
        assert!(!text.contains("918273645"), "{text}");
        assert!(text.contains("expected a string"), "{text}");
    }

    #[test]
    fn url_credentials_are_redacted() {
        for (text, expected) in [
            (
                "invalid value 'https://user:hunter2@host.example:8443/score' for '--upstream'",
                "invalid value 'https://[redacted]@host.example:8443/score' for '--upstream'",
            ),
            (
                "a http://AKIA:s3cr%2Ft@minio:9000 and b ftp://x:y@z",
                "a http://[redacted]@minio:9000 and b ftp://[redacted]@z",
            ),
            // An unescaped '/' or '#' in the password ends the authority early; still covered.
            ("url https://u:pa/ss#w@h/x", "url https://[redacted]@h/x"),
            (
                "GET http://127.0.0.1:9/c/k?sv=1 failed",
                "GET http://127.0.0.1:9/c/k?sv=1 failed",
            ),
            ("no url at all: a@b", "no url at all: a@b"),
            ("trailing ://", "trailing ://"),
            ("ünïcode https://ü:ß@h", "ünïcode https://[redacted]@h"),
        ] {
            assert_eq!(redact_url_credentials(text), expected, "{text}");
        }
    }
}
