//! Identity records: what the speed layer writes into the `events` topic itself to join an
//! anonymous visitor's profile to the person who logged in on that device.
//!
//! The two profiles usually live on two partitions, each folded by whichever replica owns
//! it, each with its own watermark. Every step of a merge is therefore a record keyed like the
//! events it must be ordered with, so that it lands on the partition of the profile it changes
//! and is folded there, in order, under that profile's watermark:
//!
//! 1. [`Link`], keyed by the **anonymous** id: the person's replica saw an event carrying both
//!    ids and asks the anonymous id's replica for it. On that partition the request is one
//!    point in the anonymous id's own event order: everything before it is the state that
//!    moves, everything after it is forwarded. No race is left to lose.
//! 2. [`Merge`] (or [`Refusal`]), keyed by the **person**: the anonymous profile's state as of
//!    the request, with the request's position as its `source`.
//! 3. [`Forward`], keyed by the person: an event of a merged anonymous id, read on its own
//!    partition after the merge and passed on whole, with its position as `source`.
//!
//! A replica that crashes between producing one of these and committing re-reads its records
//! and produces the same ones again; the receiving profile remembers, per source partition, the
//! highest source position it applied and skips anything at or below it. That is exact because
//! one producer writes a source partition's records to a target partition in source order
//! (the identity producer is ordered: see `pulse_service::outbox::Outbox::ordered`), and a new
//! owner of the source partition starts from the commit its predecessor made after Kafka
//! acknowledged them.
//!
//! Records are told from events by the [`HEADER`] header, which ingest never writes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::{millis_rfc3339, partition_key, Event};
use crate::partitioner::Placement;

/// The header that marks a record of the `events` topic as an identity record; its value is
/// the format version.
pub const HEADER: &str = "pulse.identity";
/// The format version this build writes and reads.
pub const VERSION: &str = "1";

/// The largest identity record a speed layer writes: below what the `events` topic takes with
/// Kafka's default `max.message.bytes` (1 MiB), with room for the headers. A merge carries a
/// device's whole profile, which bounded state keeps far smaller; one that is not is refused
/// rather than written (the device stays a profile of its own).
pub const MAX_RECORD_BYTES: usize = 900 * 1024;

/// Ids that never link anything: what SDKs and careless integrations send when they have no
/// id (a JavaScript `undefined` turned into text, a placeholder). Linking on one of them
/// would merge every visitor who sent it into one person. Compared trimmed and ignoring case.
pub const JUNK_IDS: &[&str] = &[
    "",
    "null",
    "undefined",
    "anonymous",
    "0",
    "-1",
    "none",
    "nil",
    "unknown",
    "[object object]",
];

/// Whether `id` must never take part in a link: one of [`JUNK_IDS`] or of the operator's own
/// list `extra` (both compared trimmed, ignoring case).
pub fn is_junk_id(id: &str, extra: &[String]) -> bool {
    let id = id.trim();
    JUNK_IDS.iter().any(|j| id.eq_ignore_ascii_case(j))
        || extra.iter().any(|j| id.eq_ignore_ascii_case(j.trim()))
}

/// Where a record was read: a partition of the events topic and an offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// One identity record (see the module documentation for the protocol).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IdentityRecord {
    Link(Link),
    Merge(Merge),
    Refusal(Refusal),
    Forward(Forward),
    /// An operator's unlink, written by `pulse-speed identities unlink` beside its record in
    /// the unlinks topic, keyed by the device: so the archive (and the warehouse's
    /// `identities`) holds it too. The rule itself comes from the unlinks topic; folding this
    /// record changes no profile.
    Unlink(Unlink),
}

/// "Anonymous id A belongs to user U": sent to A's partition by U's replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub partner_id: String,
    pub anonymous_id: String,
    pub user_id: String,
    /// When the link was seen: the `timestamp` of the event that carried both ids.
    #[serde(with = "millis_rfc3339")]
    pub linked_at: DateTime<Utc>,
    /// The `message_id` of that event.
    pub message_id: String,
    /// Where that event was read (on U's partition).
    pub origin: Position,
}

/// A's profile as of the link, sent to U's partition by A's replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Merge {
    pub partner_id: String,
    pub anonymous_id: String,
    pub user_id: String,
    #[serde(with = "millis_rfc3339")]
    pub linked_at: DateTime<Utc>,
    /// Where the [`Link`] was read (on A's partition): A's state covers A's records before it.
    pub source: Position,
    /// A's profile document (the speed layer's own format), or `None` when A had none.
    pub profile: Option<serde_json::Value>,
}

/// The link was not made; sent to U's partition by A's replica so that U stops asking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    pub partner_id: String,
    pub anonymous_id: String,
    pub user_id: String,
    pub reason: String,
    pub source: Position,
}

/// An event of a merged anonymous id, passed on to the person's partition whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    pub partner_id: String,
    /// The person the event now belongs to.
    pub user_id: String,
    /// Where the event was read (on the anonymous id's partition).
    pub source: Position,
    /// Boxed: an event is several times the size of the other records.
    pub event: Box<Event>,
}

/// An operator's decision that the device `anonymous_id` is not `user_id`'s after all
/// (`pulse-speed identities unlink`). Kept in a compacted topic (`--unlinks-topic`, keyed by
/// [`Unlink::key`]) that every process folding profiles reads before it starts: from the
/// beginning of history the device never merges again (into anyone), its merges and forwarded
/// events are not applied to a person, and no person asks for it. The same rule for the live
/// layer, a recompute and the unlink's own refold is what makes the three agree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unlink {
    pub partner_id: String,
    pub anonymous_id: String,
    /// The person the device had been merged into.
    pub user_id: String,
    #[serde(with = "millis_rfc3339")]
    pub unlinked_at: DateTime<Utc>,
}

impl Unlink {
    /// The compacted topic's key: the device's profile id.
    pub fn key(&self) -> String {
        partition_key(&self.partner_id, &self.anonymous_id)
    }
}

impl IdentityRecord {
    /// The Kafka key: the profile the record changes.
    pub fn key(&self) -> String {
        match self {
            Self::Link(l) => partition_key(&l.partner_id, &l.anonymous_id),
            Self::Merge(m) => partition_key(&m.partner_id, &m.user_id),
            Self::Refusal(r) => partition_key(&r.partner_id, &r.user_id),
            Self::Forward(f) => partition_key(&f.partner_id, &f.user_id),
            Self::Unlink(u) => u.key(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Strings, numbers, JSON values and an event: serialising cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The value of a record's [`HEADER`] when it has one: `Some` marks an identity record
    /// (decoded with [`IdentityRecord::from_record`]), `None` an event.
    pub fn marker<H: rdkafka::message::Headers>(headers: Option<&H>) -> Option<Option<&[u8]>> {
        headers?.iter().find(|h| h.key == HEADER).map(|h| h.value)
    }

    /// Decodes an identity record as every consumer must: this format's version, JSON of one
    /// of the kinds, a Kafka key equal to the record's own, on the partition murmur2 gives it,
    /// with ids that make a profile id and, for a forward, an event valid by ingest's rules.
    /// The error is the dead-letter reason.
    pub fn from_record(
        version: Option<&[u8]>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        at: Placement,
    ) -> Result<Self, String> {
        if version != Some(VERSION.as_bytes()) {
            let v = version.map(String::from_utf8_lossy);
            return Err(format!(
                "identity record of format {v:?}; this build reads {VERSION:?}"
            ));
        }
        let record: Self = serde_json::from_slice(payload.unwrap_or_default())
            .map_err(|e| format!("not an identity record: {e}"))?;
        let own = record.key();
        if key != Some(own.as_bytes()) {
            let key = key.map(String::from_utf8_lossy);
            return Err(format!(
                "record key {key:?} is not the identity record's key {own:?}"
            ));
        }
        at.check(own.as_bytes())?;
        record.check()?;
        Ok(record)
    }

    fn check(&self) -> Result<(), String> {
        use crate::validate::check_person_id;
        let (partner, ids) = match self {
            Self::Link(l) => (
                &l.partner_id,
                [("anonymous_id", &l.anonymous_id), ("user_id", &l.user_id)],
            ),
            Self::Merge(m) => (
                &m.partner_id,
                [("anonymous_id", &m.anonymous_id), ("user_id", &m.user_id)],
            ),
            Self::Refusal(r) => (
                &r.partner_id,
                [("anonymous_id", &r.anonymous_id), ("user_id", &r.user_id)],
            ),
            Self::Unlink(u) => (
                &u.partner_id,
                [("anonymous_id", &u.anonymous_id), ("user_id", &u.user_id)],
            ),
            Self::Forward(f) => {
                crate::validate::check_canonical(&f.event)
                    .map_err(|e| format!("forwarded event invalid: {e}"))?;
                if f.event.partner_id != f.partner_id {
                    return Err("forwarded event of another partner".into());
                }
                (
                    &f.partner_id,
                    [("user_id", &f.user_id), ("user_id", &f.user_id)],
                )
            }
        };
        if partner.trim().is_empty() || partner.contains(':') {
            return Err("identity record with an empty partner id or one with ':'".into());
        }
        for (field, id) in ids {
            check_person_id(field, partner, id).map_err(|e| format!("identity record: {e}"))?;
        }
        Ok(())
    }

    /// The headers every identity record carries, as a Kafka record takes them.
    pub fn headers() -> rdkafka::message::OwnedHeaders {
        rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: HEADER,
            value: Some(VERSION),
        })
    }
}

/// What a record of the `events` topic holds: an event, or one of the speed layer's identity
/// records. Every consumer of the topic decodes through [`TopicRecord::decode`], so each tells
/// them apart and checks them the same way.
///
/// Not boxed: nearly every record is an event, and a box would cost each one an allocation to
/// save the rare identity record some bytes.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum TopicRecord {
    Event(Event),
    Identity(IdentityRecord),
}

impl TopicRecord {
    /// The record read at `at` (its headers, key and payload), checked by the rules of its kind
    /// ([`Event::from_record`], [`IdentityRecord::from_record`]); the error is the dead-letter
    /// reason.
    pub fn decode<H: rdkafka::message::Headers>(
        headers: Option<&H>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        at: Placement,
    ) -> Result<Self, String> {
        match IdentityRecord::marker(headers) {
            Some(version) => {
                IdentityRecord::from_record(version, key, payload, at).map(Self::Identity)
            }
            None => Event::from_record(key, payload, at).map(Self::Event),
        }
    }

    /// The profile the record belongs to: its Kafka key.
    pub fn key(&self) -> String {
        match self {
            Self::Event(e) => e.partition_key(),
            Self::Identity(r) => r.key(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partitioner::partition_of;
    use crate::{parse_event, ParseContext};

    fn placed(key: &str) -> Placement {
        Placement {
            partition: partition_of(key.as_bytes(), 100),
            partitions: 100,
        }
    }

    fn link() -> IdentityRecord {
        IdentityRecord::Link(Link {
            partner_id: "p".into(),
            anonymous_id: "anon-1".into(),
            user_id: "u1".into(),
            linked_at: chrono::TimeZone::timestamp_millis_opt(&Utc, 1_700_000_000_123).unwrap(),
            message_id: "m1".into(),
            origin: Position {
                partition: 3,
                offset: 9,
            },
        })
    }

    #[test]
    fn a_record_reads_back_only_with_its_own_key_partition_and_version() {
        let r = link();
        let key = r.key();
        assert_eq!(key, "p:anon-1");
        let json = r.to_json();
        let v = Some(VERSION.as_bytes());
        let back = IdentityRecord::from_record(v, Some(key.as_bytes()), Some(&json), placed(&key))
            .unwrap();
        assert_eq!(back, r);
        let wrong_key = IdentityRecord::from_record(v, Some(b"p:u1"), Some(&json), placed("p:u1"));
        assert!(wrong_key
            .unwrap_err()
            .contains("is not the identity record's key"));
        let mut elsewhere = placed(&key);
        elsewhere.partition = (elsewhere.partition + 1) % 100;
        assert!(
            IdentityRecord::from_record(v, Some(key.as_bytes()), Some(&json), elsewhere).is_err()
        );
        let old = IdentityRecord::from_record(
            Some(b"0"),
            Some(key.as_bytes()),
            Some(&json),
            placed(&key),
        );
        assert!(old.unwrap_err().contains("format"));
        let junk = IdentityRecord::from_record(
            v,
            Some(key.as_bytes()),
            Some(b"{\"kind\":\"link\"}"),
            placed(&key),
        );
        assert!(junk.unwrap_err().starts_with("not an identity record"));
    }

    #[test]
    fn a_forward_carries_a_valid_event_of_its_own_partner() {
        let event = parse_event(
            r#"{"event":"add_to_cart","partner_id":"p","anonymous_id":"anon-1","cart_amount":"5"}"#,
            &ParseContext::now(),
        )
        .unwrap();
        let mut f = Forward {
            partner_id: "p".into(),
            user_id: "u1".into(),
            source: Position {
                partition: 1,
                offset: 2,
            },
            event: Box::new(event),
        };
        let ok = IdentityRecord::Forward(f.clone());
        let key = ok.key();
        let v = Some(VERSION.as_bytes());
        assert!(IdentityRecord::from_record(
            v,
            Some(key.as_bytes()),
            Some(&ok.to_json()),
            placed(&key)
        )
        .is_ok());
        f.event.partner_id = "q".into();
        let bad = IdentityRecord::Forward(f);
        let err = IdentityRecord::from_record(
            v,
            Some(key.as_bytes()),
            Some(&bad.to_json()),
            placed(&key),
        );
        assert!(err.unwrap_err().contains("another partner"));
    }

    #[test]
    fn junk_ids_are_recognised_trimmed_and_ignoring_case() {
        for id in [
            "",
            " ",
            "null",
            "NULL",
            "undefined",
            "Anonymous",
            "0",
            "-1",
            " nil ",
        ] {
            assert!(is_junk_id(id, &[]), "{id:?}");
        }
        for id in ["anon-1", "00", "u-0", "nulla"] {
            assert!(!is_junk_id(id, &[]), "{id:?}");
        }
        assert!(is_junk_id("Guest", &["guest".into()]));
    }
}
