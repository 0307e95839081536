//! A profile's part in identity unification: the anonymous ids merged into a person, the
//! links it asked for, and, on an anonymous profile that was merged, the person it now
//! belongs to. The records that carry a merge between partitions are
//! [`pulse_core::identity`]'s; what a replica does with each is in `engine::identity`.
//!
//! The rules decided here, each small and pure so they are unit-tested without Kafka:
//!
//! - a person asks once for each anonymous id it meets ([`Identity::ask`]), and once more
//!   for one still unanswered when a process loads it: never for a junk id, never beyond
//!   [`IdentityPolicy::max_aliases`] (an id asked for counts once), never again for one it
//!   has or was refused;
//! - the anonymous side decides ([`answer_link`]): an id already merged into another person
//!   stays with that person (a shared tablet, a kiosk: the first link stands), and a profile
//!   that has events of its own user id is a person, never merged into another;
//! - the person applies each source position once ([`Identity::applied`]): the merge and the
//!   forwarded events of a source partition arrive in that partition's order, so a position
//!   at or below the last applied one is a copy produced again after a crash.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How anonymous ids are linked to people.
#[derive(Debug, Clone, clap::Args)]
pub struct IdentityPolicy {
    /// Most anonymous ids merged into one person; an event that would link one more is
    /// refused (counted, and listed under the person's `identity.refused`). 0 turns linking off.
    #[arg(long = "max-aliases", env = "PULSE_MAX_ALIASES", default_value_t = 100)]
    pub max_aliases: usize,
    /// Ids that never link anything, besides the built-in ones (`null`, `undefined`,
    /// `anonymous`, `0`, `-1`, the empty string, …), comma separated, compared ignoring case.
    #[arg(long = "junk-ids", env = "PULSE_JUNK_IDS", value_delimiter = ',')]
    pub junk_ids: Vec<String>,
    /// The devices operators unlinked: read from `--unlinks-topic` before folding starts.
    #[arg(skip)]
    pub unlinks: std::sync::Arc<crate::unlinks::Unlinks>,
}

impl Default for IdentityPolicy {
    fn default() -> Self {
        Self {
            max_aliases: 100,
            junk_ids: Vec::new(),
            unlinks: Default::default(),
        }
    }
}

/// Refusals a person keeps listed (the newest): enough to see why a device did not merge,
/// bounded whatever a partner sends.
pub const REFUSALS_KEPT: usize = 20;

/// The identity part of a profile. Absent (`None` on the profile) for the many profiles that
/// never took part in a link.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Set on an anonymous profile merged into a person: that person's user id. Such a
    /// profile is a pointer, not a person: its state moved, and its events are forwarded.
    /// Stored once, as the document's indexed `merged_into` (see `Profile::to_document`).
    #[serde(skip)]
    pub merged_into: Option<String>,
    /// When the link was made (the linking event's time, epoch milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_at: Option<i64>,
    /// Anonymous ids merged into this person, in the order they were merged. Stored once, as
    /// the document's indexed `aliases` (see `Profile::to_document`), not in this object.
    #[serde(skip)]
    pub aliases: Vec<String>,
    /// Anonymous ids asked for and not answered yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    /// Those of `pending` this process asked for since it loaded the profile (not stored): a
    /// pending id is asked again once by each process that loads it (see [`Ask::Again`]).
    #[serde(skip)]
    pub asked_since_load: Vec<String>,
    /// Anonymous ids that were not linked, and why (the newest [`REFUSALS_KEPT`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Refused>,
    /// Per source partition, the highest position applied (a merge or a forwarded event).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<i32, i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub anonymous_id: String,
    pub reason: String,
}

/// What a person does about an anonymous id seen on one of its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Ask the anonymous id's partition for it.
    Link,
    /// Asked for already, not answered yet, and not by this process since it loaded the
    /// profile: ask again, once (the id stays counted once against the cap). An answer on its
    /// way makes the repeat a no-op on the device's side; an ask whose link was never written
    /// (a profile recomputed over history from before identity unification, then promoted)
    /// is made good by it instead of waiting for ever. Once per load, so a backlog (answers
    /// far behind) does not turn every event with both ids into another link.
    Again,
    /// Already merged, or refused: nothing to do.
    Known,
    /// Never linked (a junk id on either side, or the person's own id).
    Ignored,
    /// The person has [`IdentityPolicy::max_aliases`] already.
    Full,
}

/// Why links are refused, as counted (`reason` label) and listed.
pub mod refusal {
    pub const OTHER_PERSON: &str = "already linked to another user";
    pub const NOT_ANONYMOUS: &str =
        "a profile with events of its own user_id is a person and is never merged into another";
    pub const ALIAS_LIMIT: &str = "the person has the most aliases allowed (--max-aliases)";
    pub const MERGE_REFUSED: &str =
        "the merge could not be applied (the sums leave the range a profile holds exactly); the device's state is in the dead-letter topic";
    pub const TOO_LARGE: &str = "the device's state is larger than an identity record may be";
    pub const UNLINKED: &str = "unlinked by an operator (pulse-speed identities unlink)";
}

impl Identity {
    /// What to do about `anonymous_id`, seen on an event of the person `person`.
    pub fn ask(
        this: Option<&Self>,
        person: &str,
        anonymous_id: &str,
        policy: &IdentityPolicy,
    ) -> Ask {
        let junk = |id: &str| pulse_core::identity::is_junk_id(id, &policy.junk_ids);
        if policy.max_aliases == 0 || anonymous_id == person || junk(anonymous_id) || junk(person) {
            return Ask::Ignored;
        }
        let Some(this) = this else {
            return Ask::Link;
        };
        let known = this.aliases.iter().any(|a| a == anonymous_id)
            || this.refused.iter().any(|r| r.anonymous_id == anonymous_id);
        if known {
            Ask::Known
        } else if this.pending.iter().any(|a| a == anonymous_id) {
            match this.asked_since_load.iter().any(|a| a == anonymous_id) {
                true => Ask::Known,
                false => Ask::Again,
            }
        } else if this.aliases.len() + this.pending.len() >= policy.max_aliases {
            Ask::Full
        } else {
            Ask::Link
        }
    }

    /// Whether a record from `partition` at `offset` was applied already (a copy produced
    /// again after a crash of its producer).
    pub fn applied(this: Option<&Self>, partition: i32, offset: i64) -> bool {
        this.and_then(|i| i.sources.get(&partition))
            .is_some_and(|done| offset <= *done)
    }

    /// Remembers that the record from `partition` at `offset` is applied.
    pub fn apply_source(&mut self, partition: i32, offset: i64) {
        let done = self.sources.entry(partition).or_insert(offset);
        *done = (*done).max(offset);
    }

    /// `anonymous_id` asked for by this process: pending, and not asked again until the
    /// profile is loaded by another process (or again).
    pub fn asked(&mut self, anonymous_id: &str) {
        if !self.pending.iter().any(|a| a == anonymous_id) {
            self.pending.push(anonymous_id.to_string());
        }
        if !self.asked_since_load.iter().any(|a| a == anonymous_id) {
            self.asked_since_load.push(anonymous_id.to_string());
        }
    }

    /// `anonymous_id` merged.
    pub fn merged(&mut self, anonymous_id: &str) {
        self.pending.retain(|a| a != anonymous_id);
        self.asked_since_load.retain(|a| a != anonymous_id);
        if !self.aliases.iter().any(|a| a == anonymous_id) {
            self.aliases.push(anonymous_id.to_string());
        }
    }

    /// `anonymous_id` refused, for `reason`.
    pub fn refuse(&mut self, anonymous_id: &str, reason: &str) {
        self.pending.retain(|a| a != anonymous_id);
        self.asked_since_load.retain(|a| a != anonymous_id);
        self.refused.retain(|r| r.anonymous_id != anonymous_id);
        self.refused.push(Refused {
            anonymous_id: anonymous_id.to_string(),
            reason: reason.to_string(),
        });
        if self.refused.len() > REFUSALS_KEPT {
            self.refused.remove(0);
        }
    }
}

/// How an anonymous profile answers a link to `user`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Merge: its state moves to the person, its later events are forwarded.
    Merge,
    /// Already merged into that very person (a request produced again): nothing to do.
    AlreadyLinked,
    /// Not linked, for this reason (one of [`refusal`]).
    Refuse(&'static str),
}

/// The anonymous side's decision. `merged_into` is the profile's [`Identity::merged_into`] and
/// `anonymous` whether it has events of its own user id (`None` for no profile at all).
pub fn answer_link(profile: Option<(Option<&str>, bool)>, user: &str) -> Answer {
    match profile {
        None => Answer::Merge,
        Some((Some(person), _)) if person == user => Answer::AlreadyLinked,
        Some((Some(_), _)) => Answer::Refuse(refusal::OTHER_PERSON),
        Some((None, false)) => Answer::Refuse(refusal::NOT_ANONYMOUS),
        Some((None, true)) => Answer::Merge,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: usize) -> IdentityPolicy {
        IdentityPolicy {
            max_aliases: max,
            junk_ids: vec!["guest".into()],
            unlinks: Default::default(),
        }
    }

    #[test]
    fn a_person_asks_until_answered_and_never_for_junk_or_beyond_the_cap() {
        let p = policy(2);
        assert_eq!(Identity::ask(None, "u", "a1", &p), Ask::Link);
        for junk in ["", "null", "undefined", "GUEST", "u"] {
            assert_eq!(Identity::ask(None, "u", junk, &p), Ask::Ignored, "{junk:?}");
        }
        // A junk user id (a broken integration's "undefined") collects nobody's devices.
        for person in ["undefined", "null", "guest"] {
            assert_eq!(
                Identity::ask(None, person, "a1", &p),
                Ask::Ignored,
                "{person:?}"
            );
        }
        assert_eq!(Identity::ask(None, "u", "a1", &policy(0)), Ask::Ignored);
        let mut id = Identity::default();
        // Pending as loaded (asked by another process): asked again, once.
        id.pending.push("a1".into());
        assert_eq!(Identity::ask(Some(&id), "u", "a1", &p), Ask::Again);
        id.asked("a1");
        assert_eq!(id.pending, ["a1"]);
        assert_eq!(Identity::ask(Some(&id), "u", "a1", &p), Ask::Known);
        assert_eq!(Identity::ask(Some(&id), "u", "a2", &p), Ask::Link);
        id.merged("a1");
        assert_eq!(Identity::ask(Some(&id), "u", "a1", &p), Ask::Known);
        id.pending.push("a2".into());
        assert_eq!(id.aliases, vec!["a1"]);
        assert_eq!(Identity::ask(Some(&id), "u", "a3", &p), Ask::Full);
        // A pending id is asked again, not refused, when the person is full.
        assert_eq!(Identity::ask(Some(&id), "u", "a2", &p), Ask::Again);
        // What is stored does not carry what this process asked.
        let stored: Identity = serde_json::from_value(serde_json::to_value(&id).unwrap()).unwrap();
        assert!(stored.asked_since_load.is_empty() && stored.pending == id.pending);
        // A refusal frees the slot and is remembered, so the id is not asked for again.
        id.refuse("a2", refusal::OTHER_PERSON);
        assert_eq!(Identity::ask(Some(&id), "u", "a2", &p), Ask::Known);
        assert_eq!(Identity::ask(Some(&id), "u", "a3", &p), Ask::Link);
    }

    #[test]
    fn refusals_kept_are_bounded_and_the_newest() {
        let mut id = Identity::default();
        for i in 0..(REFUSALS_KEPT + 5) {
            id.refuse(&format!("a{i}"), refusal::ALIAS_LIMIT);
        }
        assert_eq!(id.refused.len(), REFUSALS_KEPT);
        assert_eq!(id.refused[0].anonymous_id, "a5");
    }

    #[test]
    fn a_source_position_is_applied_once_per_partition() {
        let mut id = Identity::default();
        assert!(!Identity::applied(Some(&id), 3, 10));
        id.apply_source(3, 10);
        assert!(Identity::applied(Some(&id), 3, 10));
        assert!(Identity::applied(Some(&id), 3, 9));
        assert!(!Identity::applied(Some(&id), 3, 11));
        assert!(!Identity::applied(Some(&id), 4, 1), "partitions are apart");
        id.apply_source(3, 5);
        assert_eq!(id.sources[&3], 10, "never moves back");
    }

    #[test]
    fn the_first_link_of_a_device_stands_and_a_person_is_never_merged() {
        assert_eq!(answer_link(None, "u1"), Answer::Merge);
        assert_eq!(answer_link(Some((None, true)), "u1"), Answer::Merge);
        assert_eq!(
            answer_link(Some((Some("u1"), true)), "u1"),
            Answer::AlreadyLinked
        );
        assert_eq!(
            answer_link(Some((Some("u1"), true)), "u2"),
            Answer::Refuse(refusal::OTHER_PERSON)
        );
        assert_eq!(
            answer_link(Some((None, false)), "u1"),
            Answer::Refuse(refusal::NOT_ANONYMOUS)
        );
    }
}
