//! Write keys: which partner a request writes for.
//!
//! Segment's convention is kept so its SDKs work unchanged: the write key is the HTTP Basic
//! user with an empty password (or, for analytics.js, `writeKey` in the body). `Bearer <key>`
//! is accepted too.

use std::collections::HashMap;
use std::path::Path;

use axum::http::HeaderMap;
use base64::Engine;

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("reading write keys file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("write keys file {path} must be a JSON object {{\"key\": \"partner_id\"}}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("write key \"{0}\" must be KEY=PARTNER_ID")]
    Flag(String),
    #[error("partner id \"{0}\" must be non-empty and contain no ':'")]
    Partner(String),
    #[error(
        "no write keys configured: pass --write-keys-file FILE or --write-key KEY=PARTNER \
         (deploy/local/write-keys.json holds keys for local development)"
    )]
    None,
}

/// Key → partner id.
#[derive(Debug, Clone, Default)]
pub struct WriteKeys {
    partners: HashMap<String, String>,
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Unknown,
}

impl WriteKeys {
    /// Loads keys from an optional JSON file plus `KEY=PARTNER` flags; at least one is required.
    pub fn load(file: Option<&Path>, flags: &[String]) -> Result<Self, KeysError> {
        let mut keys = WriteKeys::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let map: HashMap<String, String> =
                serde_json::from_str(&text).map_err(|source| KeysError::Parse {
                    path: path.display().to_string(),
                    source,
                })?;
            for (k, p) in map {
                keys.insert(k, p)?;
            }
        }
        for flag in flags.iter().filter(|f| !f.trim().is_empty()) {
            let (k, p) = flag
                .split_once('=')
                .ok_or_else(|| KeysError::Flag(flag.clone()))?;
            keys.insert(k.trim().to_string(), p.trim().to_string())?;
        }
        if keys.partners.is_empty() {
            return Err(KeysError::None);
        }
        Ok(keys)
    }

    pub fn insert(&mut self, key: String, partner: String) -> Result<(), KeysError> {
        if partner.is_empty() || partner.contains(':') {
            return Err(KeysError::Partner(partner));
        }
        if key.is_empty() {
            return Err(KeysError::Flag(format!("={partner}")));
        }
        self.partners.insert(key, partner);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.partners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.partners.is_empty()
    }

    /// The partner of the key in the request headers.
    pub fn partner_from_headers(&self, headers: &HeaderMap) -> Result<&str, AuthFailure> {
        let key = key_from_headers(headers).ok_or(AuthFailure::Missing)?;
        self.partner_of(&key)
    }

    pub fn partner_of(&self, key: &str) -> Result<&str, AuthFailure> {
        self.partners
            .get(key)
            .map(String::as_str)
            .ok_or(AuthFailure::Unknown)
    }
}

/// The write key from `Authorization: Basic base64(key:)` or `Authorization: Bearer key`.
pub fn key_from_headers(headers: &HeaderMap) -> Option<String> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, rest) = value.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let user = text.split_once(':').map_or(text.as_str(), |(u, _)| u);
        (!user.is_empty()).then(|| user.to_string())
    } else if scheme.eq_ignore_ascii_case("bearer") {
        let key = rest.trim();
        (!key.is_empty()).then(|| key.to_string())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn basic_and_bearer() {
        let keys = WriteKeys::load(None, &["k1=p1".into()]).unwrap();
        // base64("k1:")
        assert_eq!(keys.partner_from_headers(&headers("Basic azE6")), Ok("p1"));
        assert_eq!(keys.partner_from_headers(&headers("Bearer k1")), Ok("p1"));
        assert_eq!(
            keys.partner_from_headers(&headers("Bearer nope")),
            Err(AuthFailure::Unknown)
        );
        assert_eq!(
            keys.partner_from_headers(&HeaderMap::new()),
            Err(AuthFailure::Missing)
        );
        assert_eq!(
            keys.partner_from_headers(&headers("Basic !!!")),
            Err(AuthFailure::Missing)
        );
    }

    #[test]
    fn refuses_no_keys_and_bad_flags() {
        assert!(matches!(WriteKeys::load(None, &[]), Err(KeysError::None)));
        assert!(matches!(
            WriteKeys::load(None, &["nokey".into()]),
            Err(KeysError::Flag(_))
        ));
        assert!(matches!(
            WriteKeys::load(None, &["k=a:b".into()]),
            Err(KeysError::Partner(_))
        ));
    }
}
