//! What a replica does with the records of identity unification (the protocol is
//! `pulse_core::identity`'s, the profile's rules `crate::identity`'s):
//!
//! - an event of a person that carries an anonymous id asks that id's partition for it
//!   ([`Link`]), once (and once more by a process that loads it still unanswered);
//! - a [`Link`] read on the anonymous id's partition turns its profile into a pointer to the
//!   person and sends the state it had to the person's partition ([`Merge`]), or says no
//!   ([`Refusal`]);
//! - an event of a merged anonymous id that carries no user id is passed on whole
//!   ([`Forward`]); one that carries a user id takes the id back (it is a person's);
//! - a [`Merge`] or a [`Forward`] read on the person's partition is applied once per source
//!   position, under the person's own watermark, as an event would be;
//! - a device an operator unlinked (`crate::unlinks`) never merges again, into anyone; its
//!   merges and forwarded events are not applied to a person, and no person asks for it.
//!
//! Nothing here waits for another partition: each step is one record read, one profile
//! changed and at most one record written, so a merge costs the partitions involved no more
//! than the events around it.
//!
//! The rules are the [`Unifier`]'s, over a [`ProfileState`], and what they write goes through
//! [`Writes`]: the live layer sends its records and fires triggers; a recompute, which reads
//! the records the live layer wrote among the events, writes nothing and makes every decision
//! again from the same state, so it reaches the same profiles, pointers and people.

use std::time::Instant;

use pulse_core::erasure::Erasures;
use pulse_core::identity::{Forward, IdentityRecord, Link, Merge, Position, Refusal};
use pulse_core::Event;

use super::state::ProfileState;
use crate::identity::{answer_link, refusal, Answer, Ask, Identity, IdentityPolicy};
use crate::metrics as m;
use crate::profile::{Fold, Profile, Watermark};
use crate::store::DocumentStore;

/// Where a record was read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Read {
    pub partition: i32,
    pub offset: i64,
    /// One clock read per batch (profiles' last touch).
    pub clock: Instant,
    pub now_ms: i64,
}

impl Read {
    fn at(&self) -> Watermark {
        Watermark {
            partition: self.partition,
            offset: self.offset,
        }
    }

    fn position(&self) -> Position {
        Position {
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// What the identity rules do beyond the profiles.
pub(crate) trait Writes<S: DocumentStore> {
    /// An identity record decided here. The live layer sends it (through its ordered outbox);
    /// a recompute does nothing: the record the live layer sent is in what it reads.
    fn send(&mut self, record: &IdentityRecord);
    /// Folds `event` into the profile `id` and does what folding it does beside the profile
    /// (the live layer fires its triggers); the dead-letter reason of an event that cannot
    /// be folded.
    fn fold(
        &mut self,
        state: &mut ProfileState<S>,
        event: &Event,
        id: String,
        read: Read,
    ) -> Option<String>;
    /// An event (the record's own, or one forwarded) is about to be handled: the live layer's
    /// kill failpoint.
    fn handling(&mut self, _event: &Event) {}
}

/// The identity rules over a replica's profiles.
pub(crate) struct Unifier<'a, S: DocumentStore, W: Writes<S>> {
    pub state: &'a mut ProfileState<S>,
    pub policy: &'a IdentityPolicy,
    /// Erased people (`pulse_core::erasure`): their records are passed over, and no person
    /// asks for an erased device.
    pub erasures: &'a Erasures,
    pub writes: W,
}

/// A replay's [`Writes`]: records are not sent again and an event fires nothing (a recompute
/// never folds past the live layer's commit, so the live layer fired each trigger).
pub(crate) struct Replay;

impl<S: DocumentStore> Writes<S> for Replay {
    fn send(&mut self, _record: &IdentityRecord) {}

    fn fold(
        &mut self,
        state: &mut ProfileState<S>,
        event: &Event,
        id: String,
        read: Read,
    ) -> Option<String> {
        match state.fold(event, id, read.partition, read.offset, read.clock) {
            Fold::Refused(reason) => Some(reason),
            Fold::Applied | Fold::Skipped | Fold::Duplicate => None,
        }
    }
}

impl<S: DocumentStore, W: Writes<S>> Unifier<'_, S, W> {
    /// An event read for the profile `id`: passed on when `id` was merged into a person,
    /// folded otherwise. The dead-letter reason of an event that cannot be folded.
    pub fn event(&mut self, event: Event, id: String, read: Read) -> Option<String> {
        if self.erasures.erases(&event) {
            metrics::counter!(m::RECORDS_ERASED).increment(1);
            return None;
        }
        self.writes.handling(&event);
        if let Some(person) = self.forwarding(&id, read) {
            if event.user_id.is_none() && !self.unlinked(&event.partner_id, &event.anonymous_id) {
                self.forward(event, person, read);
                return None;
            }
            // An event of this id's own user: the id is a person's, whoever linked it as a
            // device (a user id sent as someone's anonymous id before its user's first
            // event). Its events are its own from now on, never forwarded to another person.
            // (Or a device unlinked whose pointer the unlink has not replaced yet, an unlink
            // cut short: its events stay its own, and running the unlink again refolds it.)
            self.reclaim(&id, &person);
        }
        self.fold_event(&event, id, read)
    }

    /// Turns the pointer `id` back into a profile of its own (empty: what the pointer had
    /// went to `person`), so that the event being read folds into it and a later link to it
    /// is refused (it is a person's now).
    fn reclaim(&mut self, id: &str, person: &str) {
        if let Some(profile) = self.state.cache.get_mut(id) {
            profile.identity = None;
            profile.anonymous = false;
            self.state.cache.redirty(id);
            metrics::counter!(m::IDENTITY_RECLAIMED).increment(1);
            tracing::warn!(
                id,
                merged_into = person,
                "an event of a user id that was linked as a device: its events are its own again"
            );
        }
    }

    /// Whether an operator unlinked the device `anonymous_id` of `partner`.
    fn unlinked(&self, partner: &str, anonymous_id: &Option<String>) -> bool {
        anonymous_id
            .as_deref()
            .is_some_and(|a| self.policy.unlinks.contains(partner, a))
    }

    /// The person a record of `id` read at `read` is passed on to: `id` is a merged device and
    /// the record is past the link (one at or below it is in the merged state already).
    fn forwarding(&self, id: &str, read: Read) -> Option<String> {
        let profile = self.state.cache.get(id)?;
        let person = profile.merged_into()?;
        if profile.covers(read.at()) {
            return None;
        }
        Some(person.to_string())
    }

    fn forward(&mut self, event: Event, person: String, read: Read) {
        let record = IdentityRecord::Forward(Forward {
            partner_id: event.partner_id.clone(),
            user_id: person,
            source: read.position(),
            event: Box::new(event),
        });
        self.writes.send(&record);
        metrics::counter!(m::IDENTITY_FORWARDED).increment(1);
    }

    /// Folds an event into `id` (a person or a device not merged), fires its triggers and asks
    /// for the anonymous ids it links to the person.
    fn fold_event(&mut self, event: &Event, id: String, read: Read) -> Option<String> {
        match self.writes.fold(self.state, event, id.clone(), read) {
            Some(refused) => Some(refused),
            None => {
                self.ask_links(event, &id, read);
                None
            }
        }
    }

    /// Asks for each anonymous id `event` links to the person `id` it was just folded into:
    /// its `anonymous_id` beside a `user_id`, and the `previousId` of a Segment `alias` call.
    fn ask_links(&mut self, event: &Event, id: &str, read: Read) {
        if event.user_id.is_none() {
            return;
        }
        // `previousId` is the client's free text (under `properties`): held to the rules of an
        // event's ids before it names a profile.
        let previous = previous_id(event).filter(|id| {
            pulse_core::validate::check_person_id("previousId", &event.partner_id, id).is_ok()
        });
        let candidates = [event.anonymous_id.as_deref(), previous];
        let erasures = self.erasures;
        for anonymous_id in candidates.into_iter().flatten() {
            if erasures.contains(&event.partner_id, anonymous_id) {
                // An erased device: nothing may link to it (its link would be passed over).
                continue;
            }
            let Some(profile) = self.state.cache.get_mut(id) else {
                return;
            };
            if profile.merged_into().is_some() || profile.anonymous {
                return;
            }
            let ask = Identity::ask(
                profile.identity.as_deref(),
                profile.user_id(),
                anonymous_id,
                self.policy,
            );
            let record = match ask {
                Ask::Known => continue,
                Ask::Ignored => {
                    metrics::counter!(m::IDENTITY_IGNORED).increment(1);
                    continue;
                }
                Ask::Full => {
                    profile
                        .identity_mut()
                        .refuse(anonymous_id, refusal::ALIAS_LIMIT);
                    metrics::counter!(m::IDENTITY_REFUSED, "reason" => "alias_limit").increment(1);
                    None
                }
                Ask::Link | Ask::Again
                    if self
                        .policy
                        .unlinks
                        .contains(profile.partner_id(), anonymous_id) =>
                {
                    profile
                        .identity_mut()
                        .refuse(anonymous_id, refusal::UNLINKED);
                    metrics::counter!(m::IDENTITY_REFUSED, "reason" => "unlinked").increment(1);
                    None
                }
                Ask::Link | Ask::Again => {
                    profile.identity_mut().asked(anonymous_id);
                    metrics::counter!(m::IDENTITY_LINKS_ASKED).increment(1);
                    Some(IdentityRecord::Link(Link {
                        partner_id: profile.partner_id().to_string(),
                        anonymous_id: anonymous_id.to_string(),
                        user_id: profile.user_id().to_string(),
                        linked_at: event.timestamp,
                        message_id: event.message_id.clone(),
                        origin: read.position(),
                    }))
                }
            };
            // The profile changed outside a fold (an event skipped or recognised as a retry
            // may still meet an id it never asked for): keep it in the next flush.
            self.state.cache.redirty(id);
            if let Some(record) = record {
                self.writes.send(&record);
            }
        }
    }

    /// An identity record read for the profile `id` (its key). The dead-letter reason of one
    /// that cannot be applied.
    pub fn record(&mut self, record: IdentityRecord, id: String, read: Read) -> Option<String> {
        if self.erasures.erases_identity(&record) {
            metrics::counter!(m::RECORDS_ERASED).increment(1);
            return None;
        }
        match record {
            IdentityRecord::Link(link) => {
                self.link(link, id, read);
                None
            }
            IdentityRecord::Forward(f) => {
                self.writes.handling(&f.event);
                if let Some(person) = self.forwarding(&id, read) {
                    // The person this was sent to is itself merged (cannot happen: a person is
                    // never merged), so pass it on rather than lose it.
                    self.forward(*f.event, person, read);
                    return None;
                }
                if self.skipped(&id, read, f.source) {
                    return None;
                }
                if f.event.user_id.is_none()
                    && self.unlinked(&f.event.partner_id, &f.event.anonymous_id)
                {
                    // The device's own again: folded there, from its own partition.
                    self.state.counts.skipped += 1;
                    return None;
                }
                let source = f.source;
                let outcome = self.fold_event(&f.event, id.clone(), read);
                if let Some(profile) = self.state.cache.get_mut(&id) {
                    if profile.covers(read.at()) {
                        profile
                            .identity_mut()
                            .apply_source(source.partition, source.offset);
                    }
                }
                outcome
            }
            IdentityRecord::Merge(merge) => self.merge(merge, id, read),
            // Its rule came from the unlinks topic before anything was folded.
            IdentityRecord::Unlink(_) => None,
            IdentityRecord::Refusal(r) => {
                if self.forwarding(&id, read).is_some() || self.skipped(&id, read, r.source) {
                    return None;
                }
                self.apply(&id, &r.partner_id, &r.user_id, read, |profile| {
                    let identity = profile.identity_mut();
                    identity.refuse(&r.anonymous_id, &r.reason);
                    identity.apply_source(r.source.partition, r.source.offset);
                    Ok(())
                })
            }
        }
    }

    /// Whether a record for the person `id` read at `read` from `source` is in the profile
    /// already: at or below its watermark (re-read after a crash), or a source position it
    /// applied (a copy its producer sent again after a crash).
    fn skipped(&mut self, id: &str, read: Read, source: Position) -> bool {
        let Some(profile) = self.state.cache.get(id) else {
            return false;
        };
        if profile.covers(read.at()) {
            self.state.counts.skipped += 1;
            return true;
        }
        if Identity::applied(profile.identity.as_deref(), source.partition, source.offset) {
            self.state.counts.duplicates += 1;
            metrics::counter!(m::IDENTITY_COPIES).increment(1);
            return true;
        }
        false
    }

    /// The anonymous side: merge, or say no, or nothing (asked again for the same person).
    fn link(&mut self, link: Link, id: String, read: Read) {
        let profile = self.state.cache.get(&id);
        if profile.is_some_and(|p| p.covers(read.at())) {
            self.state.counts.skipped += 1;
            return;
        }
        let answer = match self
            .policy
            .unlinks
            .contains(&link.partner_id, &link.anonymous_id)
        {
            true => Answer::Refuse(refusal::UNLINKED),
            false => answer_link(
                profile.map(|p| (p.merged_into(), p.anonymous)),
                &link.user_id,
            ),
        };
        match answer {
            Answer::AlreadyLinked => {}
            Answer::Refuse(reason) => {
                let label = match reason {
                    refusal::OTHER_PERSON => "other_person",
                    refusal::UNLINKED => "unlinked",
                    _ => "not_anonymous",
                };
                metrics::counter!(m::IDENTITY_REFUSED, "reason" => label).increment(1);
                tracing::info!(partner = %link.partner_id, reason, "link refused");
                self.writes.send(&IdentityRecord::Refusal(Refusal {
                    partner_id: link.partner_id,
                    anonymous_id: link.anonymous_id,
                    user_id: link.user_id,
                    reason: reason.to_string(),
                    source: read.position(),
                }));
            }
            Answer::Merge => {
                let (kinds, now) = (&self.state.settings.kinds, chrono::Utc::now());
                let state = profile
                    .filter(|p| p.event_count > 0)
                    .map(|p| p.to_document(kinds, now));
                let merge = IdentityRecord::Merge(Merge {
                    partner_id: link.partner_id.clone(),
                    anonymous_id: link.anonymous_id.clone(),
                    user_id: link.user_id.clone(),
                    linked_at: link.linked_at,
                    source: read.position(),
                    profile: state,
                });
                let size = merge.to_json().len();
                if size > pulse_core::identity::MAX_RECORD_BYTES {
                    // Bounded state keeps a device far below this; a device that is not is
                    // left as it is rather than stop the partition (Kafka would refuse it).
                    metrics::counter!(m::IDENTITY_REFUSED, "reason" => "too_large").increment(1);
                    self.writes.send(&IdentityRecord::Refusal(Refusal {
                        partner_id: link.partner_id,
                        anonymous_id: link.anonymous_id,
                        user_id: link.user_id,
                        reason: format!("{} ({size} bytes)", refusal::TOO_LARGE),
                        source: read.position(),
                    }));
                    return;
                }
                let stub = Profile::merged_stub(
                    &link.partner_id,
                    &link.anonymous_id,
                    &link.user_id,
                    link.linked_at.timestamp_millis(),
                    read.at(),
                );
                self.state.cache.fold(
                    &id,
                    read.partition,
                    read.clock,
                    || stub.clone(),
                    |p| {
                        *p = stub.clone();
                        Fold::Applied
                    },
                );
                self.writes.send(&merge);
                metrics::counter!(m::IDENTITY_MERGES_SENT).increment(1);
            }
        }
    }

    /// The person's side of a merge: the device's state added once. A merge that cannot be
    /// applied is listed as refused on the person (so it is not pending for ever) and
    /// dead-lettered: the record holds the device's state as it was.
    fn merge(&mut self, merge: Merge, id: String, read: Read) -> Option<String> {
        if self.skipped(&id, read, merge.source) {
            return None;
        }
        if self
            .policy
            .unlinks
            .contains(&merge.partner_id, &merge.anonymous_id)
        {
            // Never applied: the device keeps its history (its unlink refolded it).
            metrics::counter!(m::IDENTITY_REFUSED, "reason" => "unlinked").increment(1);
            return self.apply(&id, &merge.partner_id, &merge.user_id, read, |profile| {
                profile
                    .identity_mut()
                    .refuse(&merge.anonymous_id, refusal::UNLINKED);
                Ok(())
            });
        }
        let device = match (&merge.profile, self.forwarding(&id, read)) {
            (_, Some(_)) => Err(format!(
                "merge of {} into {}, which is itself merged into another person",
                merge.anonymous_id, merge.user_id
            )),
            (Some(doc), None) => Profile::from_document(doc, &self.state.settings.kinds)
                .map(Some)
                .map_err(|e| format!("merge of {}: state unreadable: {e}", merge.anonymous_id)),
            (None, None) => Ok(None),
        };
        let dedupe = self.state.settings.dedupe.clone();
        let refused = self.apply(&id, &merge.partner_id, &merge.user_id, read, |profile| {
            let merged = match &device {
                Ok(Some(device)) => profile.merge(device, &dedupe),
                Ok(None) => Ok(()),
                Err(e) => Err(e.clone()),
            };
            let identity = profile.identity_mut();
            identity.apply_source(merge.source.partition, merge.source.offset);
            match merged {
                Ok(()) => identity.merged(&merge.anonymous_id),
                Err(_) => identity.refuse(&merge.anonymous_id, refusal::MERGE_REFUSED),
            }
            merged
        });
        match &refused {
            None => metrics::counter!(m::IDENTITY_MERGED).increment(1),
            Some(_) => {
                metrics::counter!(m::IDENTITY_REFUSED, "reason" => "merge_failed").increment(1)
            }
        }
        refused
    }

    /// Changes the person `id` (made empty if it has no profile) with `change` under the
    /// watermark of the record read at `read`; the reason `change` gives for a record to
    /// dead-letter (the profile keeps what `change` did anyway).
    fn apply(
        &mut self,
        id: &str,
        partner_id: &str,
        person: &str,
        read: Read,
        change: impl FnOnce(&mut Profile) -> Result<(), String>,
    ) -> Option<String> {
        let kinds = &self.state.settings.kinds;
        let mut reason = None;
        self.state.cache.fold(
            id,
            read.partition,
            read.clock,
            || Profile::empty(partner_id, person, kinds),
            |profile| {
                reason = change(profile).err();
                profile.watermark = Some(read.at());
                Fold::Applied
            },
        );
        reason
    }
}

/// The id a Segment `alias` call links to its `userId`: `previousId`, kept under `properties`.
fn previous_id(event: &Event) -> Option<&str> {
    if event.event != "alias" {
        return None;
    }
    let properties = event.properties.as_ref()?;
    ["previousId", "previous_id"]
        .iter()
        .find_map(|k| properties.get(*k)?.as_str())
}
