//! Exact dedupe of client retries, per profile.
//!
//! A Segment SDK retries a batch with the same `messageId`s after a timeout or a 5xx, and an
//! ingest replica can write a batch and then fail to answer: the same event then sits in the
//! topic twice, at two offsets. The offset watermark cannot tell them apart; the message id
//! can. One user's events share a key, hence a partition and a profile, so the profile is the
//! natural place to remember which ids it has folded: no global set, nothing another partner
//! can reach (the scope is the profile, i.e. partner and user). What is remembered is a
//! 128-bit digest of each id (the first half of its SHA-256), not the id: ids are up to 128
//! characters of the client's choosing, and a public write key must not be able to grow a
//! profile by 128 KiB; a digest is 24 bytes with its time in memory, and two ids of one user
//! colliding is a 2^-128 event, not a 1% one. The digests are stored with the document (not
//! indexed), so they survive eviction, reload and crashes exactly like the rest of the profile.
//!
//! Bounded by a time window on `received_at` and a count cap ([`DedupePolicy`]): a retry that
//! arrives later than the window after the newest event, or behind more than the cap of newer
//! ids, is counted again.

use std::collections::VecDeque;

use serde_json::{json, Value};

/// How many recent message ids each profile remembers, and for how long.
#[derive(Debug, Clone, clap::Args)]
pub struct DedupePolicy {
    /// How long a message id is remembered, in seconds of ingest's `received_at`: until the
    /// user has an event received this much later than it.
    #[arg(
        long = "dedupe-window-secs",
        env = "PULSE_DEDUPE_WINDOW_SECS",
        default_value_t = 86_400
    )]
    pub window_secs: u64,
    /// Most message ids remembered per profile (the oldest go first).
    #[arg(
        long = "dedupe-max-ids",
        env = "PULSE_DEDUPE_MAX_IDS",
        default_value_t = 1_000
    )]
    pub max_ids: usize,
}

impl Default for DedupePolicy {
    fn default() -> Self {
        Self {
            window_secs: 86_400,
            max_ids: 1_000,
        }
    }
}

/// The first 128 bits of the id's SHA-256: stable across processes (it is stored).
fn digest(id: &str) -> u128 {
    use sha2::{Digest, Sha256};
    let full = Sha256::digest(id.as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&full[..16]);
    u128::from_be_bytes(first)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    digest: u128,
    /// `received_at` of the event, epoch milliseconds.
    at_ms: i64,
}

/// The message ids a profile folded recently (as digests), oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecentMessages {
    seen: VecDeque<Seen>,
    newest_ms: i64,
}

impl RecentMessages {
    pub fn contains(&self, id: &str) -> bool {
        let digest = digest(id);
        self.seen.iter().any(|s| s.digest == digest)
    }

    /// Remembers `id`, then forgets what fell out of the window or beyond the cap.
    pub fn insert(&mut self, id: &str, at_ms: i64, policy: &DedupePolicy) {
        self.seen.push_back(Seen {
            digest: digest(id),
            at_ms,
        });
        self.newest_ms = self.newest_ms.max(at_ms);
        let window_ms = i64::try_from(policy.window_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let oldest_kept = self.newest_ms.saturating_sub(window_ms);
        while self.seen.len() > policy.max_ids
            || self.seen.front().is_some_and(|s| s.at_ms < oldest_kept)
        {
            self.seen.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// `{"digests": ["<32 hex digits>", ...], "received_at": [...]}`: stored in the
    /// document, not indexed.
    pub fn to_json(&self) -> Value {
        let digests: Vec<String> = self
            .seen
            .iter()
            .map(|s| format!("{:032x}", s.digest))
            .collect();
        let at: Vec<i64> = self.seen.iter().map(|s| s.at_ms).collect();
        json!({"digests": digests, "received_at": at})
    }

    /// Restores what [`Self::to_json`] wrote; anything unreadable restores as empty (a profile
    /// written before dedupe existed).
    pub fn from_json(v: Option<&Value>) -> Self {
        let field = |name: &str| v.and_then(|v| v.get(name)).and_then(Value::as_array);
        let (Some(digests), Some(at)) = (field("digests"), field("received_at")) else {
            return Self::default();
        };
        let mut out = Self::default();
        for (d, at) in digests.iter().zip(at) {
            let digest = d.as_str().and_then(|h| u128::from_str_radix(h, 16).ok());
            if let (Some(digest), Some(at_ms)) = (digest, at.as_i64()) {
                out.seen.push_back(Seen { digest, at_ms });
                out.newest_ms = out.newest_ms.max(at_ms);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_window_and_cap() {
        let policy = DedupePolicy {
            window_secs: 60,
            max_ids: 3,
        };
        let mut r = RecentMessages::default();
        r.insert("a", 0, &policy);
        r.insert("b", 1_000, &policy);
        assert!(r.contains("a") && r.contains("b") && !r.contains("c"));
        // 61 s later, "a" and "b" are out of the window.
        r.insert("c", 61_500, &policy);
        assert!(!r.contains("a") && !r.contains("b") && r.contains("c"));
        for id in ["d", "e", "f"] {
            r.insert(id, 62_000, &policy);
        }
        assert_eq!(r.len(), 3);
        assert!(!r.contains("c") && r.contains("f"));
    }

    #[test]
    fn round_trips_through_the_document() {
        let mut r = RecentMessages::default();
        r.insert("m-1", 5, &DedupePolicy::default());
        r.insert("m-2", 7, &DedupePolicy::default());
        let back = RecentMessages::from_json(Some(&r.to_json()));
        assert_eq!(back, r);
        assert!(RecentMessages::from_json(None).is_empty());
        assert!(RecentMessages::from_json(Some(&json!({"digests": 3}))).is_empty());
        // A digest is 32 hex digits whatever the id's length.
        let mut long = RecentMessages::default();
        long.insert(&"x".repeat(128), 1, &DedupePolicy::default());
        assert_eq!(long.to_json()["digests"][0].as_str().unwrap().len(), 32);
    }
}
