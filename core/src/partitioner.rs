//! Which partition a key belongs on: Kafka's murmur2 partitioner, as Java producers and
//! librdkafka's `murmur2_random` (what every Pulse producer is configured with) compute it.
//!
//! Consumers check each record against it. The exactly-once rule of profiles (a document's
//! watermark skips what it already holds) compares offsets *within one partition*: a record
//! of user U that lands on another partition than U's other records (another producer's
//! partitioner, or a partition chosen explicitly) carries an offset of that other partition,
//! which the watermark cannot order. Folding it would make U's document bounce between the
//! two partitions' watermarks (a 409 and a re-read on every flush), so such a record is
//! refused like a record keyed for another user.

/// Kafka's `Utils.murmur2`: the 32-bit murmur2 hash with Kafka's seed, over the key's bytes.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Kafka hashes with the length as a Java int; keys past 2 GiB do not exist in Kafka.
    let mut h: u32 = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        if tail.len() == 3 {
            h ^= u32::from(tail[2]) << 16;
        }
        if tail.len() >= 2 {
            h ^= u32::from(tail[1]) << 8;
        }
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `key` in a topic of `partitions` partitions (Kafka's `toPositive(murmur2)
/// % partitions`). `partitions` must be positive.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// Where a consumer read a record: its partition, and how many partitions the topic has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub partition: i32,
    pub partitions: i32,
}

impl Placement {
    /// Why a record with `key` does not belong where it was read, if it does not.
    pub fn check(&self, key: &[u8]) -> Result<(), String> {
        let want = partition_of(key, self.partitions);
        if want == self.partition {
            return Ok(());
        }
        let key: String = String::from_utf8_lossy(key).chars().take(300).collect();
        Err(format!(
            "record on partition {} but its key {key:?} belongs on partition {want} of {} \
             (murmur2, the partitioner of Pulse's and Java's producers): one user's events must \
             stay on one partition, so it was written by another partitioner or to a chosen \
             partition",
            self.partition, self.partitions
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kafka's own cases (clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java).
    #[test]
    fn murmur2_is_kafkas() {
        for (key, hash) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
            ("1", -1_993_445_489),
            ("12", 126_087_238),
            ("123", -267_702_483),
            ("1234", -1_614_185_708),
            ("12345", -1_188_365_604),
        ] {
            assert_eq!(murmur2(key.as_bytes()), hash, "{key}");
        }
    }

    #[test]
    fn partitions_are_positive_and_in_range() {
        for i in 0..2_000 {
            let key = format!("bazaar:user-{i}");
            let p = partition_of(key.as_bytes(), 100);
            assert!((0..100).contains(&p), "{key} -> {p}");
        }
        // "21" hashes negative: toPositive masks the sign bit, it does not negate.
        assert_eq!(
            partition_of(b"21", 100),
            (-973_932_308i32 & 0x7fff_ffff) % 100
        );
    }

    #[test]
    fn a_record_on_another_partition_is_named() {
        let key = b"bazaar:u1";
        let right = partition_of(key, 100);
        let place = |partition| Placement {
            partition,
            partitions: 100,
        };
        assert!(place(right).check(key).is_ok());
        let err = place((right + 1) % 100).check(key).unwrap_err();
        assert!(
            err.contains(&format!("belongs on partition {right} of 100")),
            "{err}"
        );
    }
}
