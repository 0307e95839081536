//! Size and range limits. They protect every service behind ingest: one event is one Kafka
//! record and one profile update, so an unbounded event is an unbounded cost everywhere
//! downstream, and a value no fold can hold is a poison record for every consumer.

use rust_decimal::Decimal;

/// Largest `cart_amount` accepted, in absolute value: 10^12 (a trillion of any currency unit).
/// Far above any real cart, and small enough that a profile can sum tens of thousands of them
/// in `i64` minor units (see [`MAX_AMOUNT_SCALE`]) and BigQuery's NUMERIC holds every digit.
pub const MAX_AMOUNT: Decimal = Decimal::from_parts(3_567_587_328, 232, 0, false, 0);

/// Most decimal places of `cart_amount`: BigQuery NUMERIC's scale, so a load never rounds.
pub const MAX_AMOUNT_SCALE: u32 = 9;

/// Deepest nesting accepted inside `properties` and `context` (an object holding a scalar is
/// depth 1). Well below serde_json's recursion limit of 128, which every consumer parses the
/// whole event with: an event ingest accepts is always readable downstream.
pub const MAX_JSON_DEPTH: usize = 32;

/// The most `max_future_secs` can be set to (7 days). Consumers refuse any record dated
/// further ahead of its `received_at`, whatever ingest was configured with, so a foreign
/// producer's clock cannot move profiles into the future either.
pub const MAX_FUTURE_SECS_CEILING: u32 = 7 * 86_400;

/// Earliest accepted event time (year), and the first year past the latest. Outside this, a
/// timestamp is a unit mistake (microseconds sent as milliseconds, say), not a real event
/// time. Consumers apply the same range to `received_at`, which only a foreign producer can
/// set: a receive time in 1900 or 2200 would otherwise expire (or keep forever) every message
/// id a profile remembers for dedupe, all at once.
pub const MIN_YEAR: i32 = 2000;
pub const MAX_YEAR: i32 = 2100;

/// Longest profile id `{partner_id}:{user}`, in bytes of UTF-8: Elasticsearch refuses a
/// document `_id` past 512 bytes, so a longer id could never have a profile (and would go to
/// the profiles dead-letter topic on every flush). Ids are limited in characters too (see
/// `validate`); this bounds ids of multibyte characters.
pub const MAX_PROFILE_ID_BYTES: usize = 512;

/// Limits applied while parsing. The defaults follow Segment's (32 KiB per event), so payloads
/// that Segment accepts are accepted here too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest serialized event, in bytes.
    pub max_event_bytes: usize,
    /// Most events in one request.
    pub max_batch_events: usize,
    /// Longest string field (ids, urls, user agents), in characters.
    pub max_string_chars: usize,
    /// Most categories kept on one event.
    pub max_categories: usize,
    /// How far ahead of the receive time an event's `timestamp` may be, in seconds. Beyond it
    /// the event is refused (a clock a year off would otherwise move `last_visit` into the
    /// future for good and empty windowed models). 0 refuses any future timestamp.
    pub max_future_secs: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: 32 * 1024,
            max_batch_events: 2_000,
            max_string_chars: 4_096,
            max_categories: 32,
            max_future_secs: 86_400,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_amount_is_ten_to_the_twelfth() {
        assert_eq!(MAX_AMOUNT, Decimal::from(1_000_000_000_000_i64));
    }
}
