//! Exact dedupe of client retries, per profile.
//!
//! A Segment SDK retries a batch with the same `messageId`s after a timeout or a 5xx, and an
//! ingest replica can write a batch and then fail to answer: the same event then sits in the
//! topic twice, at two offsets. The offset watermark cannot tell them apart; the message id
//! can. One user's events share a key, hence a partition and a profile, so the profile is the
//! natural place to remember which ids it has folded: no global set, nothing another partner
//! can reach (the scope is the profile, i.e. partner and user). What is remembered is a
//! 64-bit digest of each id (the start of its SHA-256), not the id: ids are up to 128
//! characters of the client's choosing, and a public write key must not be able to grow a
//! profile by 128 KiB. A digest is 12 bytes with its time, in memory and in the document:
//! across ten million profiles the digests are most of the speed layer's memory. A new id
//! mistaken for one of a user's 1,000 remembered ids has a chance of 1,000 in 2^64 (5·10^-17):
//! one event in ten years of 300 million a day has a chance of 6·10^-5 of being taken for a
//! retry. The digests are stored with the document (not indexed), so they survive eviction,
//! reload and crashes exactly like the rest of the profile. Documents written with 96-bit
//! digests (`"v": 1`) are read by their first 64 bits: the same digest.
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

/// A message id as remembered: the first 64 bits of its SHA-256, stable across processes (it
/// is stored). Computed once per event, for both the lookup and the insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageDigest([u32; 2]);

const DIGEST_BYTES: usize = 8;
/// Bytes per entry in the stored form (`"v": 2`): the digest and the receive time in epoch
/// seconds, big-endian.
const ENTRY_BYTES: usize = DIGEST_BYTES + 4;
/// The same in `"v": 1` documents, whose digests were 96 bits.
const V1_ENTRY_BYTES: usize = 16;

impl MessageDigest {
    pub fn of(id: &str) -> Self {
        use sha2::{Digest, Sha256};
        Self::from_bytes(&Sha256::digest(id.as_bytes()))
    }

    /// The digest whose stored form starts `bytes` (at least [`DIGEST_BYTES`] long).
    fn from_bytes(bytes: &[u8]) -> Self {
        let word =
            |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        Self([word(0), word(4)])
    }

    fn to_bytes(self) -> [u8; DIGEST_BYTES] {
        let mut out = [0u8; DIGEST_BYTES];
        out[..4].copy_from_slice(&self.0[0].to_be_bytes());
        out[4..].copy_from_slice(&self.0[1].to_be_bytes());
        out
    }
}

/// One remembered id: 12 bytes (the digest as two words keeps the alignment at 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Remembered {
    digest: MessageDigest,
    /// Receive time, epoch seconds (the window needs no finer grain).
    at: u32,
}

/// The message ids a profile folded recently (as digests), oldest first, with their receive
/// times. Grown by an eighth at a time rather than doubled: it is most of a profile's memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecentMessages {
    entries: VecDeque<Remembered>,
    newest: u32,
}

impl RecentMessages {
    pub fn contains(&self, digest: MessageDigest) -> bool {
        self.entries.iter().any(|e| e.digest == digest)
    }

    /// Remembers a message received at `at_ms`, then forgets what fell out of the window or
    /// beyond the cap.
    pub fn insert(&mut self, digest: MessageDigest, at_ms: i64, policy: &DedupePolicy) {
        let at = u32::try_from(at_ms.div_euclid(1000)).unwrap_or(u32::MAX);
        let window = u32::try_from(policy.window_secs).unwrap_or(u32::MAX);
        self.newest = self.newest.max(at);
        let oldest_kept = self.newest.saturating_sub(window);
        // Forget first, so a profile at its cap reuses the slot rather than growing.
        while self.entries.len() >= policy.max_ids
            || self.entries.front().is_some_and(|e| e.at < oldest_kept)
        {
            if self.entries.pop_front().is_none() {
                return; // a cap of 0: nothing is remembered
            }
        }
        if self.entries.len() == self.entries.capacity() {
            self.entries.reserve_exact((self.entries.len() / 8).max(2));
        }
        self.entries.push_back(Remembered { digest, at });
    }

    /// Adds the ids `other` remembers (a merged anonymous profile's), in receive-time order
    /// with this profile's own, each once, then forgets what falls out of the window or beyond
    /// the cap: a retry of an event folded on either side before a merge is recognised after
    /// it.
    pub fn merge(&mut self, other: &RecentMessages, policy: &DedupePolicy) {
        let mut entries: Vec<Remembered> = self
            .entries
            .iter()
            .copied()
            .chain(
                other
                    .entries
                    .iter()
                    .copied()
                    .filter(|e| !self.contains(e.digest)),
            )
            .collect();
        // Stable: at equal times this profile's ids stay before the merged ones.
        entries.sort_by_key(|e| e.at);
        *self = Self::default();
        for e in entries {
            self.insert(e.digest, i64::from(e.at) * 1000, policy);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `{"v": 2, "entries": "<base64>"}`, 12 bytes per id (digest, then the receive time as
    /// big-endian epoch seconds): one string, so a profile with 1,000 ids adds 16 KB to its
    /// document, not 2,000 JSON values for Elasticsearch to parse on every write. Stored, not
    /// indexed.
    pub fn to_json(&self) -> Value {
        use base64::Engine;
        let mut bytes = Vec::with_capacity(self.entries.len() * ENTRY_BYTES);
        for e in &self.entries {
            bytes.extend_from_slice(&e.digest.to_bytes());
            bytes.extend_from_slice(&e.at.to_be_bytes());
        }
        let entries = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
        json!({"v": 2, "entries": entries})
    }

    /// Restores what [`Self::to_json`] wrote (or its `"v": 1` form); anything unreadable
    /// restores as empty (a profile written before dedupe existed, or by an unknown layout).
    pub fn from_json(v: Option<&Value>) -> Self {
        use base64::Engine;
        let entry_bytes = match v.and_then(|v| v.get("v")).and_then(Value::as_u64) {
            Some(2) => ENTRY_BYTES,
            Some(1) => V1_ENTRY_BYTES,
            _ => return Self::default(),
        };
        let Some(text) = v.and_then(|v| v.get("entries")).and_then(Value::as_str) else {
            return Self::default();
        };
        let Ok(bytes) = base64::engine::general_purpose::STANDARD_NO_PAD.decode(text) else {
            return Self::default();
        };
        let mut out = Self::default();
        out.entries.reserve_exact(bytes.len() / entry_bytes);
        for entry in bytes.chunks_exact(entry_bytes) {
            let (digest, at) = entry.split_at(entry_bytes - 4);
            let at = u32::from_be_bytes([at[0], at[1], at[2], at[3]]);
            out.entries.push_back(Remembered {
                digest: MessageDigest::from_bytes(digest),
                at,
            });
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
        assert!(RecentMessages::from_json(Some(&json!({"v": 2, "entries": 3}))).is_empty());
        assert!(RecentMessages::from_json(Some(&json!({"v": 3, "entries": ""}))).is_empty());
        assert!(RecentMessages::from_json(Some(&json!({"v": 1, "entries": "!!"}))).is_empty());
        // 12 bytes per id whatever the id's length: 1,000 ids stay near 16 KB of text.
        let mut long = RecentMessages::default();
        for i in 0..1_000 {
            long.insert(
                d(&format!("{i}{}", "x".repeat(120))),
                1,
                &DedupePolicy::default(),
            );
        }
        let text = long.to_json()["entries"].as_str().unwrap().len();
        assert!((16_000..16_100).contains(&text), "{text}");
    }

    #[test]
    fn reads_the_96_bit_digests_of_version_1_by_their_first_64_bits() {
        use base64::Engine;
        use sha2::{Digest, Sha256};
        let full = Sha256::digest(b"m-1");
        let mut v1 = full[..12].to_vec();
        v1.extend_from_slice(&5u32.to_be_bytes());
        let text = base64::engine::general_purpose::STANDARD_NO_PAD.encode(v1);
        let back = RecentMessages::from_json(Some(&json!({"v": 1, "entries": text})));
        assert_eq!(back.len(), 1);
        assert!(back.contains(d("m-1")) && !back.contains(d("m-2")));
        assert_eq!(back.newest, 5);
    }
}
