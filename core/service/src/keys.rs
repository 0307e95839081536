//! Partner keys: which partner a request writes (or reads) for.
//!
//! Two kinds, never interchangeable. **Write keys** are public by design: they ship in
//! browser JavaScript and mobile apps, as Segment's do, so they can only add events. **Read
//! keys** are a partner's secrets (like Segment's Profile API token) and are required by every
//! endpoint that returns personal data; ingest never loads them.
//!
//! Segment's convention is kept so its SDKs work unchanged: the key is the HTTP Basic user
//! with an empty password (or, for analytics.js, `writeKey` in the body). `Bearer <key>` is
//! accepted too.

use std::collections::HashMap;
use std::path::Path;

use axum::http::HeaderMap;
use base64::Engine;

/// Which kind of key a [`PartnerKeys`] holds; it names the flags in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyKind {
    #[default]
    Write,
    Read,
}

impl KeyKind {
    fn name(self) -> &'static str {
        match self {
            KeyKind::Write => "write",
            KeyKind::Read => "read",
        }
    }
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("reading {kind} keys file {path}: {source}")]
    Read {
        kind: KeyKind,
        path: String,
        source: std::io::Error,
    },
    #[error("{kind} keys file {path} must be a JSON object {{\"key\": \"partner_id\"}}: {source}")]
    Parse {
        kind: KeyKind,
        path: String,
        source: serde_json::Error,
    },
    #[error("{0} key \"{1}\" must be KEY=PARTNER_ID")]
    Flag(KeyKind, String),
    #[error("partner id \"{0}\" must be non-empty and contain no ':'")]
    Partner(String),
    #[error(
        "no {0} keys configured: pass --{0}-keys-file FILE or --{0}-key KEY=PARTNER \
         (deploy/local/{0}-keys.json holds keys for local development)"
    )]
    None(KeyKind),
    #[error(
        "a key is configured both as a write key and as a read key (partner {0}): write keys \
         are public, so a read key must be a different secret"
    )]
    Shared(String),
}

/// Key → partner id, for one kind of key, and the web origins each partner's keys may be
/// used from.
#[derive(Debug, Clone, Default)]
pub struct PartnerKeys {
    kind: KeyKind,
    partners: HashMap<String, String>,
    /// Partner → allowed browser origins. A partner absent here allows any origin (the
    /// default: a partner tightens it by listing its sites).
    origins: HashMap<String, Vec<String>>,
}

/// One entry of a keys file: `"key": "partner"`, or `"key": {"partner": "p", "origins":
/// ["https://shop.example"]}` to restrict the browser origins the key is accepted from.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum KeyEntry {
    Partner(String),
    Full {
        partner: String,
        #[serde(default)]
        origins: Option<Vec<String>>,
    },
}

/// An origin as compared: lower case, no trailing slash (`https://Shop.example/` is
/// `https://shop.example`).
fn normalize_origin(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// The keys ingest accepts.
pub type WriteKeys = PartnerKeys;

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Unknown,
}

impl PartnerKeys {
    /// Loads write keys from an optional JSON file plus `KEY=PARTNER` flags; at least one is
    /// required.
    pub fn load(file: Option<&Path>, flags: &[String]) -> Result<Self, KeysError> {
        Self::load_kind(KeyKind::Write, file, flags)
    }

    /// Loads keys of `kind` from an optional JSON file plus `KEY=PARTNER` flags; at least one
    /// is required.
    pub fn load_kind(
        kind: KeyKind,
        file: Option<&Path>,
        flags: &[String],
    ) -> Result<Self, KeysError> {
        let mut keys = PartnerKeys {
            kind,
            ..PartnerKeys::default()
        };
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
                kind,
                path: path.display().to_string(),
                source,
            })?;
            let map: HashMap<String, KeyEntry> =
                serde_json::from_str(&text).map_err(|source| KeysError::Parse {
                    kind,
                    path: path.display().to_string(),
                    source,
                })?;
            for (k, entry) in map {
                match entry {
                    KeyEntry::Partner(p) => keys.insert(k, p)?,
                    KeyEntry::Full { partner, origins } => {
                        if let Some(origins) = origins {
                            keys.origins
                                .entry(partner.clone())
                                .or_default()
                                .extend(origins.iter().map(|o| normalize_origin(o)));
                        }
                        keys.insert(k, partner)?;
                    }
                }
            }
        }
        for flag in flags.iter().filter(|f| !f.trim().is_empty()) {
            let (k, p) = flag
                .split_once('=')
                .ok_or_else(|| KeysError::Flag(kind, flag.clone()))?;
            keys.insert(k.trim().to_string(), p.trim().to_string())?;
        }
        if keys.partners.is_empty() {
            return Err(KeysError::None(kind));
        }
        Ok(keys)
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// Whether a browser page at `origin` may use `partner`'s keys: yes unless the partner
    /// listed its origins and this is not one of them (`"*"` in the list allows any).
    pub fn origin_allowed(&self, partner: &str, origin: &str) -> bool {
        match self.origins.get(partner) {
            None => true,
            Some(list) => {
                let origin = normalize_origin(origin);
                list.iter().any(|o| o == "*" || *o == origin)
            }
        }
    }

    /// The origins `partner` allows, for error messages (`None`: any).
    pub fn allowed_origins(&self, partner: &str) -> Option<&[String]> {
        self.origins.get(partner).map(Vec::as_slice)
    }

    pub fn insert(&mut self, key: String, partner: String) -> Result<(), KeysError> {
        if partner.is_empty() || partner.contains(':') {
            return Err(KeysError::Partner(partner));
        }
        if key.is_empty() {
            return Err(KeysError::Flag(self.kind, format!("={partner}")));
        }
        self.partners.insert(key, partner);
        Ok(())
    }

    /// Refuses a key that is in both rings: a secret that is also public is no secret.
    pub fn check_disjoint(&self, other: &PartnerKeys) -> Result<(), KeysError> {
        match self
            .partners
            .iter()
            .find(|(k, _)| other.partners.contains_key(*k))
        {
            Some((_, partner)) => Err(KeysError::Shared(partner.clone())),
            None => Ok(()),
        }
    }

    pub fn len(&self) -> usize {
        self.partners.len()
    }

    /// Every (key, partner), ordered by key.
    pub fn by_key(&self) -> Vec<(&str, &str)> {
        let mut all: Vec<(&str, &str)> = self
            .partners
            .iter()
            .map(|(k, p)| (k.as_str(), p.as_str()))
            .collect();
        all.sort_unstable();
        all
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
    fn origins_per_partner_from_the_keys_file() {
        let path = std::env::temp_dir().join(format!("pulse-keys-{}.json", std::process::id()));
        std::fs::write(
            &path,
            r#"{"k1": "open", "k2": {"partner": "strict", "origins": ["https://Shop.example/"]},
                "k3": {"partner": "any", "origins": ["*"]}, "k4": {"partner": "plain"}}"#,
        )
        .unwrap();
        let keys = WriteKeys::load(Some(&path), &[]).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(keys.partner_of("k2"), Ok("strict"));
        assert!(keys.origin_allowed("open", "https://anything.example"));
        assert!(keys.origin_allowed("plain", "https://anything.example"));
        assert!(keys.origin_allowed("any", "https://anything.example"));
        assert!(keys.origin_allowed("strict", "https://shop.example"));
        assert!(keys.origin_allowed("strict", "HTTPS://SHOP.EXAMPLE"));
        assert!(!keys.origin_allowed("strict", "https://evil.example"));
        assert!(!keys.origin_allowed("strict", "null"));
    }

    #[test]
    fn a_key_cannot_be_both_public_and_secret() {
        let write = WriteKeys::load(None, &["pub=p1".into(), "k2=p2".into()]).unwrap();
        let read = PartnerKeys::load_kind(KeyKind::Read, None, &["k2=p2".into()]).unwrap();
        assert!(matches!(read.check_disjoint(&write), Err(KeysError::Shared(p)) if p == "p2"));
        let read = PartnerKeys::load_kind(KeyKind::Read, None, &["secret=p2".into()]).unwrap();
        assert!(read.check_disjoint(&write).is_ok());
    }

    #[test]
    fn refuses_no_keys_and_bad_flags() {
        assert!(matches!(
            WriteKeys::load(None, &[]),
            Err(KeysError::None(KeyKind::Write))
        ));
        assert!(matches!(
            WriteKeys::load(None, &["nokey".into()]),
            Err(KeysError::Flag(..))
        ));
        let e = PartnerKeys::load_kind(KeyKind::Read, None, &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("no read keys configured: pass --read-keys-file"),
            "{e}"
        );
        assert!(matches!(
            WriteKeys::load(None, &["k=a:b".into()]),
            Err(KeysError::Partner(_))
        ));
    }
}
