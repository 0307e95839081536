//! Size limits. They protect every service behind ingest: one event is one Kafka record and one
//! profile update, so an unbounded event is an unbounded cost everywhere downstream.

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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: 32 * 1024,
            max_batch_events: 2_000,
            max_string_chars: 4_096,
            max_categories: 32,
        }
    }
}
