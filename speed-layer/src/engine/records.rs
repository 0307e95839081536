//! Handling a batch of records: decode each (or dead-letter it), load the profiles not in
//! memory with one `mget`, fold each event in order and fire its triggers at once (identity
//! records, and the events of merged devices, are handled in `identity.rs`).

use std::collections::HashSet;
use std::time::Instant;

use chrono::Utc;
use pulse_core::erasure::Erasures;
use pulse_core::identity::{IdentityRecord, TopicRecord};
use pulse_core::partitioner::Placement;
use pulse_core::Event;
use rdkafka::message::{Message, OwnedMessage};

use super::identity::{Read, Unifier, Writes};
use super::outbox::SpeedOutbox;
use super::state::ProfileState;
use super::{Engine, Failpoints};
use crate::metrics as m;
use crate::poison;
use crate::profile::{Fold, Profile, Watermark};
use crate::store::{DocumentStore, ProfileStore};
use crate::triggers::{RuleSet, TriggerMessage};

/// Loading and folding: the state's side of reading records.
impl<S: DocumentStore> ProfileState<S> {
    /// Loads the profiles `ids` from the store (batched mget), retrying while it is
    /// unavailable: a profile is never assumed new just because the store did not answer.
    /// `false` when the process stopped before the store answered.
    pub fn load(&mut self, ids: &[String]) -> bool {
        for chunk in ids.chunks(1000) {
            let asked = Instant::now();
            let (store, ready) = (self.flusher.store(), &self.health.reads);
            let loaded = self.runtime.block_on(self.settings.policy.retry().run(
                &self.shutdown,
                "loading profiles",
                |_| true,
                || async move {
                    let docs = store.mget(chunk).await;
                    ready.set(docs.is_ok());
                    docs
                },
            ));
            let Ok(docs) = loaded else {
                return false;
            };
            metrics::counter!(m::PROFILES_LOADED).increment(docs.len() as u64);
            let now = Instant::now();
            let took = now - asked;
            metrics::histogram!(m::PROFILE_LOAD_SECONDS).record(took.as_secs_f64());
            tracing::debug!(
                ids = chunk.len(),
                found = docs.len(),
                ?took,
                "profiles loaded"
            );
            for (id, doc) in docs {
                match Profile::from_document(&doc, &self.settings.kinds) {
                    Ok(profile) => self.cache.insert_loaded(profile, now),
                    Err(e) => {
                        tracing::error!(id, error = %e, "stored profile unreadable; it will be rebuilt from new events only")
                    }
                }
            }
        }
        true
    }

    /// Loads those of `ids` not in memory (each once, one batched mget): what a batch of
    /// records needs before it is folded. `false` when the process stopped first.
    pub fn load_absent<'a>(&mut self, ids: impl Iterator<Item = &'a str>) -> bool {
        let mut seen = HashSet::new();
        let written = self.written.as_ref();
        let missing: Vec<String> = ids
            .filter(|id| !self.cache.contains(id) && seen.insert(*id))
            .filter(|id| written.is_none_or(|w| w.may_hold(id)))
            .map(str::to_string)
            .collect();
        self.load(&missing)
    }

    /// Folds `event` (the record at `offset` of `partition`) into the profile `id`, touched
    /// at `touched` (one clock read per batch, not per event).
    pub fn fold(
        &mut self,
        event: &Event,
        id: String,
        partition: i32,
        offset: i64,
        touched: Instant,
    ) -> Fold {
        let (kinds, dedupe) = (&self.settings.kinds, &self.settings.dedupe);
        let at = Watermark { partition, offset };
        // A forwarded event is folded into its person, not under its own key.
        let own = event.has_key(id.as_bytes());
        let person = match own {
            true => String::new(),
            false => pulse_core::event::person_of(&id).to_string(),
        };
        let outcome = self.cache.fold(
            &id,
            partition,
            touched,
            || match own {
                true => Profile::new(event, kinds),
                false => Profile::new_for(event, &person, kinds),
            },
            |profile| profile.fold(event, at, dedupe),
        );
        match outcome {
            Fold::Applied => self.counts.folded += 1,
            Fold::Skipped => self.counts.skipped += 1,
            Fold::Duplicate => self.counts.duplicates += 1,
            Fold::Refused(_) => {}
        }
        outcome
    }
}

/// A record's content and profile id (its key), or why it is not usable.
type Decoded = Result<(TopicRecord, String), String>;

impl Engine {
    /// Folds a batch of records: one mget for the profiles not in memory, then each record in
    /// order. Records of partitions no longer owned, or about to be re-read, are dropped: they
    /// are another replica's now, or will come again.
    pub(super) fn process(&mut self, batch: &[OwnedMessage]) {
        let clock = Instant::now();
        let mut parsed: Vec<(&OwnedMessage, Decoded)> = Vec::with_capacity(batch.len());
        for msg in batch {
            let partition = msg.partition();
            if self.state.is_rewinding(partition) || !self.state.positions.owns(partition) {
                continue;
            }
            poison::working_on(partition, msg.offset());
            let result = match self.poisoned(partition, msg.offset()) {
                Some(reason) => Err(format!(
                    "this record made pulse-speed panic ({reason}); dead-lettered on the restart"
                )),
                None => decode(msg, self.partitions),
            };
            parsed.push((msg, result));
        }
        // Loading is not any one record's doing.
        poison::idle();
        let ids = parsed
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok().map(|(_, id)| id.as_str()));
        if !self.state.load_absent(ids) {
            // Stopping during an outage: nothing of the batch is folded or passed, so it is
            // read again after the restart.
            return;
        }
        let now_ms = Utc::now().timestamp_millis();
        let before = self.state.counts;
        let feed = self.erasures.clone();
        let erasures = feed.read();
        for (msg, result) in parsed {
            let partition = msg.partition();
            if self.state.is_rewinding(partition) {
                continue;
            }
            poison::working_on(partition, msg.offset());
            let read = Read {
                partition,
                offset: msg.offset(),
                clock,
                now_ms,
            };
            let refused = match result {
                Ok((TopicRecord::Event(event), id)) => {
                    self.unifier(&erasures).event(event, id, read)
                }
                Ok((TopicRecord::Identity(record), id)) => {
                    self.unifier(&erasures).record(record, id, read)
                }
                Err(reason) => Some(reason),
            };
            if let Some(reason) = refused {
                self.outbox.dead_letter_record(msg, &reason);
            }
            self.state.positions.handled(partition, msg.offset());
        }
        poison::idle();
        // Metrics per batch, not per event: a registry lookup per event costs real throughput.
        let after = self.state.counts;
        metrics::counter!(m::EVENTS_FOLDED).increment(after.folded - before.folded);
        metrics::counter!(m::EVENTS_SKIPPED).increment(after.skipped - before.skipped);
        metrics::counter!(m::EVENTS_DUPLICATE).increment(after.duplicates - before.duplicates);
        self.state.gauges();
    }

    /// The identity rules over this replica's profiles, writing as the live layer does.
    fn unifier<'a>(&'a mut self, erasures: &'a Erasures) -> Unifier<'a, ProfileStore, Live<'a>> {
        Unifier {
            state: &mut self.state,
            policy: &self.identity,
            erasures,
            writes: Live {
                outbox: &self.outbox,
                rules: &self.rules,
                failpoints: &self.failpoints,
            },
        }
    }

    /// The panic message of a record that made an earlier run panic.
    fn poisoned(&self, partition: i32, offset: i64) -> Option<&String> {
        if self.poison.is_empty() {
            return None;
        }
        self.poison.get(&(partition, offset))
    }
}

/// The canonical event (or identity record) of a record and its profile id, or why it is
/// not usable.
fn decode(msg: &OwnedMessage, partitions: i32) -> Decoded {
    let at = Placement {
        partition: msg.partition(),
        partitions,
    };
    let record = TopicRecord::decode(msg.headers(), msg.key(), msg.payload(), at)?;
    let id = record.key();
    Ok((record, id))
}

/// The live layer's [`Writes`]: identity records through the ordered outbox, an event's
/// triggers fired as soon as it is folded.
struct Live<'a> {
    outbox: &'a SpeedOutbox,
    rules: &'a RuleSet,
    failpoints: &'a Failpoints,
}

impl Writes<ProfileStore> for Live<'_> {
    fn send(&mut self, record: &IdentityRecord) {
        self.outbox.identity(record);
    }

    /// Folds one event and fires its triggers; returns the dead-letter reason of an event
    /// that cannot be folded.
    fn fold(
        &mut self,
        state: &mut ProfileState<ProfileStore>,
        event: &Event,
        id: String,
        read: Read,
    ) -> Option<String> {
        if self.failpoints.panic.as_deref() == Some(event.message_id.as_str()) {
            panic!("failpoint: folding message_id {}", event.message_id);
        }
        if self.failpoints.fatal_producer.as_deref() == Some(event.message_id.as_str()) {
            self.outbox.inject_fatal_error("failpoint");
        }
        // The profile's person, for the triggers: the event's own id, or the person its merged
        // device belongs to. Taken before the fold owns `id`, and only when a rule matches.
        let person = self
            .rules
            .matching(event)
            .next()
            .map(|_| pulse_core::event::person_of(&id).to_string());
        match state.fold(event, id, read.partition, read.offset, read.clock) {
            // Already in the profile, or a client retry folded once already (its triggers
            // fired then).
            Fold::Skipped | Fold::Duplicate => return None,
            Fold::Refused(reason) => return Some(reason),
            Fold::Applied => {}
        }
        // Fired now, not at flush: a marketer's trigger must not wait 30 s. A re-read event
        // fires again with the same idempotency key; the notifier delivers it once.
        let person = person.as_deref().unwrap_or_default();
        for rule in self.rules.matching(event) {
            self.outbox.trigger(&TriggerMessage::for_person(
                rule,
                event,
                person,
                read.now_ms,
            ));
            metrics::counter!(m::TRIGGERS_FIRED, "rule" => rule.id.clone()).increment(1);
        }
        None
    }

    /// See `SpeedConfig::failpoint_kill_message_ids`.
    fn handling(&mut self, event: &Event) {
        if !self.failpoints.kill.is_empty() && self.failpoints.kill.contains(&event.message_id) {
            crate::poison::kill_self(&format!("message_id {}", event.message_id));
        }
    }
}
