//! Erasure requests: the right to be forgotten (GDPR art. 17, KVKK).
//!
//! An erasure names one id of one partner: a user id, an anonymous id, or an anonymous id
//! found merged into an erased person (an alias). It is kept in a compacted topic
//! (`--erasures-topic`, keyed by [`Erasure::key`], the id's profile id) that ingest and every
//! consumer read whole before they take anything and then follow for as long as they run, so
//! a suppression survives restarts and reaches every replica. From then on:
//!
//! - ingest drops the person's events (or refuses them with 403);
//! - every reader of the `events` topic and of the archive (the speed layer, the archiver,
//!   a recompute, the warehouse load) passes over the person's records;
//! - `pulse-admin users erase` deletes what is already stored.
//!
//! Ids share the profile-id namespace (`{partner_id}:{id}`): an event is the person's when
//! its [`Event::person_id`] is erased, which is the id its profile is kept under. So an event
//! of another user on a shared device (user id V, an erased device's anonymous id) is V's
//! and is kept.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::{millis_rfc3339, partition_key, person_of, Event};
use crate::identity::IdentityRecord;

/// What kind of id an erasure names. Informational (the audit log shows it): matching
/// compares ids whatever their kind, as profile ids do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum IdKind {
    User,
    Anonymous,
    /// An anonymous id that had been merged into an erased person.
    Alias,
}

/// One erased id, as stored in the erasures topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Erasure {
    pub partner_id: String,
    pub id: String,
    pub kind: IdKind,
    /// The request it belongs to (the audit log's id): a person and their aliases share one.
    pub request_id: String,
    #[serde(with = "millis_rfc3339")]
    pub requested_at: DateTime<Utc>,
}

impl Erasure {
    /// The compacted topic's key: the id's profile id.
    pub fn key(&self) -> String {
        partition_key(&self.partner_id, &self.id)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Strings and a time: serialising cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The erased ids, by partner: what every reader checks each record against. Checking is free
/// when nothing is erased and one hash lookup by borrowed strings otherwise.
#[derive(Debug, Clone, Default)]
pub struct Erasures {
    by_partner: HashMap<String, HashSet<String>>,
    len: usize,
    /// Every profile id in the order it was erased. A reader that holds state of its own (the
    /// speed layer's profiles in memory, the archiver's open units) keeps a cursor into it and
    /// acts on what was added since ([`Erasures::since`]).
    log: Vec<String>,
}

impl Erasures {
    /// Adds one erased id; false when it was there already.
    pub fn insert(&mut self, partner_id: &str, id: &str) -> bool {
        let added = self
            .by_partner
            .entry(partner_id.to_string())
            .or_default()
            .insert(id.to_string());
        if added {
            self.len += 1;
            self.log.push(partition_key(partner_id, id));
        }
        added
    }

    /// Withdraws the erasure of a profile id (a tombstone in the topic: an operator's undo of
    /// a mistaken request). What was deleted stays deleted.
    pub fn withdraw(&mut self, profile_id: &str) {
        let Some((partner, id)) = profile_id.split_once(':') else {
            return;
        };
        if let Some(ids) = self.by_partner.get_mut(partner) {
            if ids.remove(id) {
                self.len -= 1;
            }
            if ids.is_empty() {
                self.by_partner.remove(partner);
            }
        }
    }

    /// Whether `id` of `partner_id` is erased.
    pub fn contains(&self, partner_id: &str, id: &str) -> bool {
        self.len > 0
            && self
                .by_partner
                .get(partner_id)
                .is_some_and(|ids| ids.contains(id))
    }

    /// Whether the profile id `{partner_id}:{id}` is erased.
    pub fn contains_profile(&self, profile_id: &str) -> bool {
        self.len > 0
            && profile_id
                .split_once(':')
                .is_some_and(|(partner, _)| self.contains(partner, person_of(profile_id)))
    }

    /// Whether `event` is an erased person's: its person id (user id, else anonymous id).
    pub fn erases(&self, event: &Event) -> bool {
        self.contains(&event.partner_id, event.person_id())
    }

    /// Whether an identity record names an erased id: the device, the person, or (for a
    /// forward) the event's own person.
    pub fn erases_identity(&self, record: &IdentityRecord) -> bool {
        if self.len == 0 {
            return false;
        }
        let hit = |partner: &str, ids: &[&str]| ids.iter().any(|id| self.contains(partner, id));
        match record {
            IdentityRecord::Link(l) => hit(&l.partner_id, &[&l.anonymous_id, &l.user_id]),
            IdentityRecord::Merge(m) => hit(&m.partner_id, &[&m.anonymous_id, &m.user_id]),
            IdentityRecord::Refusal(r) => hit(&r.partner_id, &[&r.anonymous_id, &r.user_id]),
            IdentityRecord::Forward(f) => hit(&f.partner_id, &[&f.user_id, f.event.person_id()]),
            IdentityRecord::Unlink(u) => hit(&u.partner_id, &[&u.anonymous_id, &u.user_id]),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Each partner with erasures, and its erased ids (unordered).
    pub fn by_partner(&self) -> impl Iterator<Item = (&str, Vec<&str>)> {
        self.by_partner
            .iter()
            .map(|(partner, ids)| (partner.as_str(), ids.iter().map(String::as_str).collect()))
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where a reader that has seen everything so far stands in the log.
    pub fn cursor(&self) -> usize {
        self.log.len()
    }

    /// The profile ids erased since `cursor` (a value of [`Erasures::cursor`]).
    pub fn since(&self, cursor: usize) -> &[String] {
        self.log.get(cursor..).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_event, ParseContext};

    fn event(json: &str) -> Event {
        parse_event(json, &ParseContext::now()).unwrap()
    }

    #[test]
    fn an_event_is_erased_by_its_person_id_of_its_own_partner() {
        let mut e = Erasures::default();
        let user =
            event(r#"{"event":"page_view","partner_id":"p1","user_id":"u1","anonymous_id":"a9"}"#);
        let same_id_other_partner =
            event(r#"{"event":"page_view","partner_id":"p2","user_id":"u1"}"#);
        let device = event(r#"{"event":"page_view","partner_id":"p1","anonymous_id":"a1"}"#);
        let other_user_on_device =
            event(r#"{"event":"page_view","partner_id":"p1","user_id":"u2","anonymous_id":"a1"}"#);
        assert!(!e.erases(&user), "nothing erased");
        assert!(e.insert("p1", "u1"));
        assert!(!e.insert("p1", "u1"), "once");
        assert!(e.insert("p1", "a1"));
        assert!(e.erases(&user));
        assert!(!e.erases(&same_id_other_partner), "partners are apart");
        assert!(e.erases(&device));
        assert!(
            !e.erases(&other_user_on_device),
            "another user's event on an erased device is theirs"
        );
        assert!(e.contains_profile("p1:u1"));
        assert!(!e.contains_profile("p2:u1"));
        assert_eq!(e.len(), 2);
        assert_eq!(e.since(0), ["p1:u1".to_string(), "p1:a1".to_string()]);
        assert_eq!(e.since(e.cursor()), [] as [String; 0]);
        assert_eq!(e.since(99), [] as [String; 0]);
        e.withdraw("p1:u1");
        assert!(!e.erases(&user));
        assert_eq!(e.len(), 1);
        e.withdraw("no colon");
        e.withdraw("p9:x");
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn ids_with_colons_stay_one_id() {
        let mut e = Erasures::default();
        e.insert("p1", "mail:a@b.c");
        assert!(e.contains_profile("p1:mail:a@b.c"));
        assert!(e.contains("p1", "mail:a@b.c"));
        e.withdraw("p1:mail:a@b.c");
        assert!(e.is_empty());
    }

    #[test]
    fn the_record_round_trips_and_refuses_strangers() {
        let r = Erasure {
            partner_id: "p1".into(),
            id: "u1".into(),
            kind: IdKind::Alias,
            request_id: "r1".into(),
            requested_at: DateTime::from_timestamp_millis(1_700_000_000_123).unwrap(),
        };
        let json = r.to_json();
        assert_eq!(serde_json::from_slice::<Erasure>(&json).unwrap(), r);
        assert_eq!(r.key(), "p1:u1");
        assert!(serde_json::from_str::<Erasure>(r#"{"partner_id":"p1","id":"u1"}"#).is_err());
    }
}
