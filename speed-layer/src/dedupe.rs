//! Exact dedupe of client retries, per profile.
//!
//! A Segment SDK retries a batch with the same `messageId`s after a timeout or a 5xx, and an
//! ingest replica can write a batch and then fail to answer: the same event then sits in the
//! topic twice, at two offsets. The offset watermark cannot tell them apart; the message id
//! can. One user's events share a key, hence a partition and a profile, so the profile is the
//! natural place to remember which ids it has folded: no global set, nothing another partner
//! can reach (the scope is the profile, i.e. partner and user). What is remembered is a
//! 96-bit digest of each id (the start of its SHA-256), not the id: ids are up to 128
//! characters of the client's choosing, and a public write key must not be able to grow a
//! profile by 128 KiB; a digest is 16 bytes with its time, and two of a user's 1,000 ids
//! colliding is a 10^-23 event, not a 1% one. The digests are stored with the document (not
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
    #[arg(long = "dedupe-window-secs", env = "PULSE_DEDUPE_WINDOW_SECS", default_value_t = 86_400)]
    pub window_secs: u64,
    /// Most message ids remembered per profile (the oldest go first).
    #[arg(long = "dedupe-max-ids", env = "PULSE_DEDUPE_MAX_IDS", default_value_t = 1_000)]
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

/// A message id as remembered: the first 96 bits of its SHA-256, stable across processes (it
/// is stored). Computed once per event, for both the lookup and the insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageDigest([u8; DIGEST_BYTES]);

const DIGEST_BYTES: usize = 12;
/// Bytes per entry in the stored form: the digest and the receive time in epoch seconds.
const ENTRY_BYTES: usize = DIGEST_BYTES + 4;

impl MessageDigest {
    pub fn of(id: &str) -> Self {
        use sha2::{Digest, Sha256};
        let full = Sha256::digest(id.as_bytes());
        let mut first = [0u8; DIGEST_BYTES];
        first.copy_from_slice(&full[..DIGEST_BYTES]);
        Self(first)
    }
}

/// The message ids a profile folded recently (as digests), oldest first, with their receive
/// times in epoch seconds (the window needs no finer grain). Two parallel queues, so a lookup
/// scans 12-byte digests only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecentMessages {
    digests: VecDeque<MessageDigest>,
    received: VecDeque<u32>,
    newest: u32,
}

impl RecentMessages {
    pub fn contains(&self, digest: MessageDigest) -> bool {
        self.digests.contains(&digest)
    }

    /// Remembers a message received at `at_ms`, then forgets what fell out of the window or
    /// beyond the cap.
    pub fn insert(&mut self, digest: MessageDigest, at_ms: i64, policy: &DedupePolicy) {
        let at = u32::try_from(at_ms.div_euclid(1000)).unwrap_or(u32::MAX);
        self.digests.push_back(digest);
        self.received.push_back(at);
        self.newest = self.newest.max(at);
        let window = u32::try_from(policy.window_secs).unwrap_or(u32::MAX);
        let oldest_kept = self.newest.saturating_sub(window);
        while self.digests.len() > policy.max_ids
            || self.received.front().is_some_and(|t| *t < oldest_kept)
        {
            self.digests.pop_front();
            self.received.pop_front();
        }
    }

    /// Adds the ids `other` remembers (a merged anonymous profile's), in receive-time order
    /// with this profile's own, each once, then forgets what falls out of the window or beyond
    /// the cap: a retry of an event folded on either side before a merge is recognised after
    /// it.
    pub fn merge(&mut self, other: &RecentMessages, policy: &DedupePolicy) {
        let mut entries: Vec<(u32, MessageDigest)> = self
            .received
            .iter()
            .copied()
            .zip(self.digests.iter().copied())
            .chain(
                other
                    .received
                    .iter()
                    .copied()
                    .zip(other.digests.iter().copied())
                    .filter(|(_, d)| !self.digests.contains(d)),
            )
            .collect();
        // Stable: at equal times this profile's ids stay before the merged ones.
        entries.sort_by_key(|(at, _)| *at);
        *self = Self::default();
        for (at, digest) in entries {
            self.insert(digest, i64::from(at) * 1000, policy);
        }
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// `{"v": 1, "entries": "<base64>"}`, 16 bytes per id (digest, then the receive time as
    /// big-endian epoch seconds): one string, so a profile with 1,000 ids adds 21 KB to its
    /// document, not 2,000 JSON values for Elasticsearch to parse on every write. Stored, not
    /// indexed.
    pub fn to_json(&self) -> Value {
        use base64::Engine;
        let mut bytes = Vec::with_capacity(self.digests.len() * ENTRY_BYTES);
        for (d, t) in self.digests.iter().zip(&self.received) {
            bytes.extend_from_slice(&d.0);
            bytes.extend_from_slice(&t.to_be_bytes());
        }
        let entries = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
        json!({"v": 1, "entries": entries})
    }

    /// Restores what [`Self::to_json`] wrote; anything unreadable restores as empty (a profile
    /// written before dedupe existed, or by an older layout).
    pub fn from_json(v: Option<&Value>) -> Self {
        use base64::Engine;
        let Some(text) = v
            .filter(|v| v.get("v").and_then(Value::as_u64) == Some(1))
            .and_then(|v| v.get("entries"))
            .and_then(Value::as_str)
        else {
            return Self::default();
        };
        let Ok(bytes) = base64::engine::general_purpose::STANDARD_NO_PAD.decode(text) else {
            return Self::default();
        };
        let mut out = Self::default();
        for entry in bytes.chunks_exact(ENTRY_BYTES) {
            let (digest, at) = entry.split_at(DIGEST_BYTES);
            let mut d = [0u8; DIGEST_BYTES];
            d.copy_from_slice(digest);
            let mut t = [0u8; 4];
            t.copy_from_slice(at);
            let at = u32::from_be_bytes(t);
            out.digests.push_back(MessageDigest(d));
            out.received.push_back(at);
            out.newest = out.newest.max(at);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: &str) -> MessageDigest {
        MessageDigest::of(id)
    }

    #[test]
    fn remembers_within_window_and_cap() {
        let policy = DedupePolicy {
            window_secs: 60,
            max_ids: 3,
        };
        let mut r = RecentMessages::default();
        r.insert(d("a"), 0, &policy);
        r.insert(d("b"), 1_000, &policy);
        assert!(r.contains(d("a")) && r.contains(d("b")) && !r.contains(d("c")));
        // 61 s later, "a" and "b" are out of the window.
        r.insert(d("c"), 62_000, &policy);
        assert!(!r.contains(d("a")) && !r.contains(d("b")) && r.contains(d("c")));
        for id in ["d", "e", "f"] {
            r.insert(d(id), 62_000, &policy);
        }
        assert_eq!(r.len(), 3);
        assert!(!r.contains(d("c")) && r.contains(d("f")));
    }

    #[test]
    fn a_merge_unites_the_ids_in_time_order_within_window_and_cap() {
        let policy = DedupePolicy {
            window_secs: 60,
            max_ids: 4,
        };
        let mut person = RecentMessages::default();
        person.insert(d("p1"), 9_000, &policy);
        person.insert(d("both"), 20_000, &policy);
        person.insert(d("p2"), 70_000, &policy);
        let mut device = RecentMessages::default();
        device.insert(d("old"), 1_000, &policy);
        device.insert(d("both"), 20_000, &policy);
        device.insert(d("a1"), 30_000, &policy);
        person.merge(&device, &policy);
        // "old" and "p1" are more than 60 s older than the newest (70 s); "both" once.
        assert!(!person.contains(d("old")) && !person.contains(d("p1")));
        assert!(person.contains(d("both")) && person.contains(d("a1")) && person.contains(d("p2")));
        assert_eq!(person.len(), 3);
        let capped = DedupePolicy {
            window_secs: 1_000,
            max_ids: 2,
        };
        let mut small = RecentMessages::default();
        small.insert(d("x"), 5_000, &capped);
        small.merge(&device, &capped);
        assert_eq!(small.len(), 2);
        assert!(
            small.contains(d("both")) && small.contains(d("a1")),
            "the two newest"
        );
    }

    #[test]
    fn round_trips_through_the_document() {
        let mut r = RecentMessages::default();
        r.insert(d("m-1"), 5_000, &DedupePolicy::default());
        r.insert(d("m-2"), 7_000, &DedupePolicy::default());
        let back = RecentMessages::from_json(Some(&r.to_json()));
        assert_eq!(back, r);
        assert!(RecentMessages::from_json(None).is_empty());
        assert!(RecentMessages::from_json(Some(&json!({"v": 1, "entries": 3}))).is_empty());
        assert!(RecentMessages::from_json(Some(&json!({"v": 1, "entries": "!!"}))).is_empty());
        // 16 bytes per id whatever the id's length: 1,000 ids stay near 21 KB of text.
        let mut long = RecentMessages::default();
        for i in 0..1_000 {
            long.insert(
                d(&format!("{i}{}", "x".repeat(120))),
                1,
                &DedupePolicy::default(),
            );
        }
        let text = long.to_json()["entries"].as_str().unwrap().len();
        assert!((21_000..21_500).contains(&text), "{text}");
    }
}
