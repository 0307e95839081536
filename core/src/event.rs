//! The canonical event: the one form every part of Pulse reads from the `events` topic.

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::partitioner::Placement;

/// One user event, validated and normalised.
///
/// This is the JSON written to Kafka. Absent optional fields are omitted, amounts are decimal
/// strings (exact, no float drift), timestamps RFC 3339 in UTC with millisecond precision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// The dedupe key everywhere: the archive, the warehouse, triggers.
    pub message_id: String,
    /// snake_case type: `page_view`, `add_to_cart`, `purchase`, …
    pub event: String,
    pub partner_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    /// When the event happened (the client's clock; receive time when the client sent none).
    #[serde(with = "millis_rfc3339")]
    pub timestamp: DateTime<Utc>,
    /// When ingest accepted it.
    #[serde(with = "millis_rfc3339")]
    pub received_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub category: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search_query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_id: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "rust_decimal::serde::str_option"
    )]
    pub cart_amount: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gender: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_session: Option<bool>,
    /// Free object, kept as JSON. Unknown top-level fields of a native event land here too, so
    /// nothing a client sent is lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Event {
    /// The Kafka key: `{partner_id}:{user_id}`, or the anonymous id for a visitor who has not
    /// been identified. One key → one partition → per-user order.
    pub fn partition_key(&self) -> String {
        let user = self
            .user_id
            .as_deref()
            .or(self.anonymous_id.as_deref())
            .unwrap_or_default();
        partition_key(&self.partner_id, user)
    }

    /// The id that identifies the person: `user_id`, else `anonymous_id`. Parsing guarantees
    /// that one of them is present.
    pub fn person_id(&self) -> &str {
        self.user_id
            .as_deref()
            .or(self.anonymous_id.as_deref())
            .unwrap_or_default()
    }

    /// Parses the canonical JSON written by ingest. Strict: this is our own format, so any
    /// deviation means a foreign producer and the record goes to the dead-letter topic.
    pub fn from_canonical_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Decodes a record of the `events` topic as every consumer must: canonical JSON, the
    /// rules of [`crate::validate::check_canonical`], a Kafka key equal to the event's own,
    /// and the partition murmur2 gives that key (a wrong key or partition puts a user's
    /// events on several partitions: per-user order and the profile watermark would no
    /// longer hold; see [`crate::partitioner`]). The error is the dead-letter reason.
    pub fn from_record(
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        at: Placement,
    ) -> Result<Self, String> {
        let payload = payload.unwrap_or_default();
        let event = Self::from_canonical_json(payload)
            .map_err(|e| format!("not a canonical event: {e}"))?;
        crate::validate::check_canonical(&event).map_err(|e| format!("invalid event: {e}"))?;
        let Some(key) = key.filter(|k| event.has_key(k)) else {
            let key = key.map(String::from_utf8_lossy);
            return Err(format!(
                "record key {key:?} is not the event's key {:?}",
                event.partition_key()
            ));
        };
        at.check(key)?;
        Ok(event)
    }

    /// Whether `key` is this event's [`Event::partition_key`], compared piece by piece: no
    /// string is built for the check every consumer makes on every record.
    pub fn has_key(&self, key: &[u8]) -> bool {
        let (partner, user) = (self.partner_id.as_bytes(), self.person_id().as_bytes());
        key.len() == partner.len() + 1 + user.len()
            && key.starts_with(partner)
            && key[partner.len()] == b':'
            && key.ends_with(user)
    }

    pub fn to_canonical_json(&self) -> Vec<u8> {
        // Serialising a struct of strings, decimals and JSON maps cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `{partner_id}:{user}`. Partner ids never contain ':' (validated), so the key is unambiguous.
pub fn partition_key(partner_id: &str, user: &str) -> String {
    let mut key = String::with_capacity(partner_id.len() + user.len() + 1);
    key.push_str(partner_id);
    key.push(':');
    key.push_str(user);
    key
}

/// The user (or anonymous) id of a profile id `{partner_id}:{user}`: what follows the first
/// ':' (partner ids never contain one), or the whole id when there is none.
pub fn person_of(profile_id: &str) -> &str {
    profile_id
        .split_once(':')
        .map_or(profile_id, |(_, user)| user)
}

/// RFC 3339, UTC, milliseconds: the one timestamp form on the topic.
pub mod millis_rfc3339 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}
