//! Unit tests of the flush, commit, re-read and eviction rules of [`ProfileState`], against a
//! profile store in memory that answers as Elasticsearch does (external versions: an older
//! version is refused with 409) and an effects recorder in place of Kafka.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pulse_core::erasure::Erasures;
use pulse_core::{parse_event, Event, ParseContext};
use pulse_service::consumer::Commit;
use pulse_service::{Readiness, Shutdown};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use serde_json::Value;

use super::state::{Effects, ProfileState, Settings};
use crate::config::FlushPolicy;
use crate::dedupe::DedupePolicy;
use crate::profile::Fold;
use crate::store::{DocWrite, DocumentStore, ItemOutcome, StoreError};

/// Documents by id, with their external version; `down` fails every call as an unreachable
/// cluster would.
#[derive(Clone, Default)]
struct MemoryStore {
    inner: Arc<Mutex<Stored>>,
}

#[derive(Default)]
struct Stored {
    docs: HashMap<String, (i64, Value)>,
    down: bool,
    /// `_bulk` answers 429 while `mget` works.
    refuse_bulk: bool,
    /// Ids refused for good, as a mapping error would be.
    refuse: std::collections::HashSet<String>,
    /// Every id an mget asked for, in order.
    asked: Vec<String>,
}

impl MemoryStore {
    fn stored(&self) -> std::sync::MutexGuard<'_, Stored> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_down(&self, down: bool) {
        self.stored().down = down;
    }

    /// The stored document of `id` without its write time.
    fn doc(&self, id: &str) -> Option<Value> {
        let mut doc = self.stored().docs.get(id)?.1.clone();
        doc.as_object_mut()?.remove("updated_at");
        Some(doc)
    }

    fn watermark_offset(&self, id: &str) -> Option<i64> {
        self.doc(id)?["watermark"]["offset"].as_i64()
    }
}

fn unreachable() -> StoreError {
    StoreError::Transport("connection refused".into())
}

impl DocumentStore for MemoryStore {
    fn alias(&self) -> &str {
        "profiles"
    }

    fn mget(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<HashMap<String, Value>, StoreError>> + Send {
        let mut stored = self.stored();
        stored.asked.extend_from_slice(ids);
        let result = if stored.down {
            Err(unreachable())
        } else {
            Ok(ids
                .iter()
                .filter_map(|id| Some((id.clone(), stored.docs.get(id)?.1.clone())))
                .collect())
        };
        std::future::ready(result)
    }

    fn bulk_write(
        &self,
        docs: &[DocWrite],
    ) -> impl Future<Output = Result<Vec<ItemOutcome>, StoreError>> + Send {
        let mut stored = self.stored();
        let result = if stored.down {
            Err(unreachable())
        } else if stored.refuse_bulk {
            Err(StoreError::Status {
                status: 429,
                body: "es_rejected_execution_exception".into(),
            })
        } else {
            let mut outcomes = Vec::with_capacity(docs.len());
            for d in docs {
                if stored.refuse.contains(&d.id) {
                    outcomes.push(ItemOutcome::Rejected("mapper_parsing_exception".into()));
                    continue;
                }
                // version_type external_gte: a version below the stored one is refused.
                if stored.docs.get(&d.id).is_some_and(|(v, _)| *v > d.version) {
                    outcomes.push(ItemOutcome::Stale);
                    continue;
                }
                let doc: Value = serde_json::from_slice(&d.doc).unwrap_or_default();
                stored.docs.insert(d.id.clone(), (d.version, doc));
                outcomes.push(ItemOutcome::Written);
            }
            Ok(outcomes)
        };
        std::future::ready(result)
    }
}

/// Kafka as the state sees it: commits (or a crash before them) and dead-lettered documents.
#[derive(Default)]
struct Recorder {
    commits: RefCell<Vec<(i32, i64)>>,
    dead_letters: RefCell<Vec<String>>,
    /// The process dies after the bulk write, before the commit reaches Kafka.
    crash_before_commit: bool,
    /// Kafka has not acknowledged every trigger and dead letter sent.
    unconfirmed: Cell<bool>,
}

impl Recorder {
    fn committed(&self) -> Vec<(i32, i64)> {
        let mut commits = self.commits.borrow().clone();
        commits.sort();
        commits
    }
}

impl Commit for Recorder {
    fn commit(&self, positions: &[(i32, i64)]) -> Result<(), KafkaError> {
        if self.crash_before_commit {
            return Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::BrokerTransportFailure,
            ));
        }
        self.commits.borrow_mut().extend_from_slice(positions);
        Ok(())
    }
}

impl Effects for Recorder {
    fn dead_letter_document(&self, write: &DocWrite, _partition: i32, _reason: &str) {
        self.dead_letters.borrow_mut().push(write.id.clone());
    }

    fn confirm(&self) -> Result<(), String> {
        match self.unconfirmed.get() {
            true => Err("Kafka refused 1 record(s): message too large".into()),
            false => Ok(()),
        }
    }
}

fn settings(max_profiles: usize, idle: Duration) -> Settings {
    Settings {
        kinds: crate::models::registry(),
        dedupe: DedupePolicy::default(),
        policy: FlushPolicy {
            interval_secs: 3600.0,
            max_dirty: 1_000,
            bulk_docs: 100,
            max_backoff_secs: 0.1,
        },
        max_profiles,
        idle_evict: idle,
    }
}

fn state_with(store: &MemoryStore, settings: Settings) -> ProfileState<MemoryStore> {
    state_ready(store, settings, &Readiness::new("test"))
}

fn state_ready(
    store: &MemoryStore,
    settings: Settings,
    ready: &Readiness,
) -> ProfileState<MemoryStore> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    ProfileState::new(
        store.clone(),
        Arc::new(runtime),
        settings,
        ready,
        Shutdown::new(),
    )
}

fn state(store: &MemoryStore) -> ProfileState<MemoryStore> {
    state_with(store, settings(1_000, Duration::from_secs(3600)))
}

fn cart(user: &str, n: usize, amount: &str) -> Event {
    let json = format!(
        r#"{{"event":"add_to_cart","partner_id":"p1","user_id":"{user}","message_id":"{user}-{n}","cart_amount":"{amount}","gender":"female"}}"#
    );
    parse_event(&json, &ParseContext::now()).expect("a valid event")
}

/// Reads `events` as the records at `first..` of `partition`: loads, folds, handles.
fn read(
    state: &mut ProfileState<MemoryStore>,
    partition: i32,
    first: i64,
    events: &[Event],
) -> Vec<Fold> {
    let ids: Vec<String> = events.iter().map(Event::partition_key).collect();
    assert!(state.load(&ids));
    let mut outcomes = Vec::new();
    for (i, event) in events.iter().enumerate() {
        let offset = first + i as i64;
        let now = std::time::Instant::now();
        outcomes.push(state.fold(event, event.partition_key(), partition, offset, now));
        state.positions.handled(partition, offset);
    }
    outcomes
}

fn flush_all(state: &mut ProfileState<MemoryStore>, fx: &Recorder) -> Option<bool> {
    state.start_flush_all(fx);
    state.finish_flush(fx, true)
}

#[test]
fn a_crash_between_bulk_and_commit_re_reads_and_ends_exact() {
    let events: Vec<Event> = (0..4).map(|n| cart("u", n, "10.10")).collect();
    // What one run without a crash stores.
    let truth = MemoryStore::default();
    let mut once = state(&truth);
    once.positions.assign(&[0]);
    read(&mut once, 0, 0, &events);
    assert_eq!(flush_all(&mut once, &Recorder::default()), Some(false));

    let store = MemoryStore::default();
    let mut first = state(&store);
    first.positions.assign(&[0]);
    read(&mut first, 0, 0, &events[..3]);
    let crash = Recorder {
        crash_before_commit: true,
        ..Recorder::default()
    };
    flush_all(&mut first, &crash);
    assert_eq!(
        store.watermark_offset("p1:u"),
        Some(2),
        "the bulk write went through"
    );
    assert!(crash.committed().is_empty(), "the commit did not");
    // The fourth event was folded but never flushed when the process died.
    read(&mut first, 0, 3, &events[3..]);
    drop(first);

    // The restart re-reads from the last commit (none: the start) on top of the stored
    // document: what it holds is skipped, the rest folded once.
    let mut second = state(&store);
    second.positions.assign(&[0]);
    let outcomes = read(&mut second, 0, 0, &events);
    assert_eq!(
        outcomes,
        [Fold::Skipped, Fold::Skipped, Fold::Skipped, Fold::Applied]
    );
    let fx = Recorder::default();
    assert_eq!(flush_all(&mut second, &fx), Some(false));
    assert_eq!(fx.committed(), [(0, 4)]);
    assert_eq!(store.doc("p1:u"), truth.doc("p1:u"));
    assert_eq!(
        store.doc("p1:u").map(|d| d["cart_amount"].clone()),
        Some("40.4".into())
    );
}

#[test]
fn a_newer_stored_document_re_reads_the_partition_from_its_last_commit() {
    let store = MemoryStore::default();
    let mut state = state(&store);
    state.positions.assign(&[0]);
    read(&mut state, 0, 0, &[cart("u", 0, "1"), cart("u", 1, "1")]);
    let fx = Recorder::default();
    assert_eq!(flush_all(&mut state, &fx), Some(false));
    assert_eq!(fx.committed(), [(0, 2)]);

    read(&mut state, 0, 2, &[cart("u", 2, "1"), cart("u", 3, "1")]);
    // Meanwhile another writer (a replica that took the partition over) stored a newer
    // version of the profile.
    let mut other = self::state(&store);
    other.positions.assign(&[0]);
    let events: Vec<Event> = (0..6).map(|n| cart("u", n, "1")).collect();
    read(&mut other, 0, 0, &events);
    assert_eq!(flush_all(&mut other, &Recorder::default()), Some(false));

    // Our write is refused (409): nothing is committed past the last commit, the partition
    // is re-read from it, and its records are dropped until then.
    assert_eq!(flush_all(&mut state, &fx), Some(false));
    assert_eq!(fx.committed(), [(0, 2)]);
    assert!(state.is_rewinding(0));
    assert_eq!(state.take_rewinds(), [(0, Some(2))]);
    assert!(
        !state.cache.contains("p1:u"),
        "reloaded from the store on the re-read"
    );
    let again = read(&mut state, 0, 2, &events[2..4]);
    assert_eq!(again, [Fold::Skipped, Fold::Skipped]);
    assert_eq!(store.watermark_offset("p1:u"), Some(5));
}

#[test]
fn a_newer_document_on_a_fresh_assignment_re_reads_from_the_first_record_read() {
    let store = MemoryStore::default();
    let mut state = state(&store);
    state.positions.assign(&[0]);
    read(&mut state, 0, 7, &[cart("u", 7, "1")]);
    let mut other = self::state(&store);
    other.positions.assign(&[0]);
    read(&mut other, 0, 9, &[cart("u", 9, "1")]);
    assert_eq!(flush_all(&mut other, &Recorder::default()), Some(false));

    let fx = Recorder::default();
    flush_all(&mut state, &fx);
    // Nothing was committed since the assignment: the re-read starts at the first record
    // this member read, a concrete offset (librdkafka refuses to seek to "stored").
    assert_eq!(state.take_rewinds(), [(0, Some(7))]);
    assert!(fx.committed().is_empty());
}

#[test]
fn a_partition_revoked_mid_flush_commits_what_was_stored_and_forgets_the_rest() {
    let store = MemoryStore::default();
    let mut state = state(&store);
    state.positions.assign(&[0, 1]);
    read(&mut state, 0, 0, &[cart("a", 0, "1"), cart("a", 1, "1")]);
    read(&mut state, 1, 0, &[cart("b", 0, "1"), cart("b", 1, "1")]);
    // A flush starts; an event of partition 1 is folded while it runs.
    let fx = Recorder::default();
    assert!(state.start_flush_all(&fx));
    read(&mut state, 1, 2, &[cart("b", 2, "1")]);

    // Partition 1 is revoked: the flush in flight completes and commits what it covered,
    // then the event folded since is flushed and committed before the partition is gone.
    state.give_up(&fx, &[1], false);
    assert_eq!(fx.committed(), [(0, 2), (1, 2), (1, 3)]);
    assert_eq!(store.watermark_offset("p1:b"), Some(2));
    assert!(!state.positions.owns(1));
    assert!(!state.cache.contains("p1:b"));
    assert!(state.cache.contains("p1:a"));

    // Revoked while the store is down: nothing past the stored state is committed, and the
    // dirty profiles are dropped (the next owner re-reads them from the last commit).
    read(&mut state, 0, 2, &[cart("a", 2, "1")]);
    store.set_down(true);
    state.give_up(&fx, &[0], false);
    assert_eq!(fx.committed(), [(0, 2), (1, 2), (1, 3)]);
    assert_eq!(state.cache.dirty(), 0);
    assert_eq!(store.watermark_offset("p1:a"), Some(1));
}

#[test]
fn a_lost_partition_is_dropped_without_writing_what_was_folded_since() {
    let store = MemoryStore::default();
    let mut state = state(&store);
    state.positions.assign(&[0]);
    read(&mut state, 0, 0, &[cart("a", 0, "1")]);
    let fx = Recorder::default();
    state.give_up(&fx, &[0], true);
    assert!(fx.committed().is_empty());
    assert!(store.doc("p1:a").is_none());
    assert_eq!(state.cache.len(), 0);
}

#[test]
fn eviction_of_a_dirty_profile_is_refused_until_it_is_stored() {
    let store = MemoryStore::default();
    // Evict everything clean at once.
    let mut state = state_with(&store, settings(0, Duration::ZERO));
    state.positions.assign(&[0]);
    read(&mut state, 0, 0, &[cart("a", 0, "5")]);
    store.set_down(true);
    let fx = Recorder::default();
    assert_eq!(flush_all(&mut state, &fx), Some(true));
    // The flush failed: the profile is dirty again and stays in memory.
    assert!(state.cache.contains("p1:a"));
    assert_eq!(state.cache.dirty(), 1);
    assert!(fx.committed().is_empty());

    store.set_down(false);
    assert_eq!(flush_all(&mut state, &fx), Some(false));
    assert_eq!(fx.committed(), [(0, 1)]);
    assert!(!state.cache.contains("p1:a"), "evicted once stored");
    assert_eq!(store.watermark_offset("p1:a"), Some(0));
    // Seen again: reloaded, so the next event adds to the stored cart.
    read(&mut state, 0, 1, &[cart("a", 1, "5")]);
    flush_all(&mut state, &fx);
    assert_eq!(
        store.doc("p1:a").map(|d| d["cart_amount"].clone()),
        Some("10".into())
    );
}

#[test]
fn a_failed_flush_is_due_again_after_its_backoff_not_a_whole_interval() {
    let store = MemoryStore::default();
    let mut state = state(&store);
    state.positions.assign(&[0]);
    read(&mut state, 0, 0, &[cart("a", 0, "1")]);
    assert!(!state.flush_due(), "the interval is an hour");
    store.set_down(true);
    let fx = Recorder::default();
    assert_eq!(flush_all(&mut state, &fx), Some(true));
    std::thread::sleep(state.retry_in() + Duration::from_millis(1));
    assert!(state.flush_due());
}

#[test]
fn a_document_refused_for_good_is_dead_lettered_and_its_partition_committed() {
    let store = MemoryStore::default();
    store.stored().refuse.insert("p1:a".into());
    let mut state = state(&store);
    state.positions.assign(&[0]);
    read(&mut state, 0, 0, &[cart("a", 0, "1"), cart("b", 1, "1")]);
    let fx = Recorder::default();
    assert_eq!(flush_all(&mut state, &fx), Some(false));
    // One bad document neither holds back its partition nor is dropped.
    assert_eq!(*fx.dead_letters.borrow(), ["p1:a"]);
    assert_eq!(fx.committed(), [(0, 2)]);
    assert_eq!(store.watermark_offset("p1:b"), Some(1));
    assert_eq!(state.cache.dirty(), 0);
}

#[test]
fn no_watermark_is_written_before_the_triggers_of_its_events_are_acknowledged() {
    let store = MemoryStore::default();
    let ready = Readiness::new("test");
    let mut state = state_ready(&store, settings(1_000, Duration::from_secs(3600)), &ready);
    state.positions.assign(&[0]);
    read(&mut state, 0, 0, &[cart("a", 0, "1")]);
    let fx = Recorder::default();
    fx.unconfirmed.set(true);
    // A stored watermark would make a re-read skip the event, and its trigger with it: no
    // flush starts, nothing is committed, and readiness says why.
    assert!(!state.start_flush_all(&fx));
    assert!(store.doc("p1:a").is_none());
    assert!(fx.committed().is_empty());
    assert_eq!(state.cache.dirty(), 1);
    let reason = ready.check().expect_err("not ready");
    assert!(reason.contains("not acknowledged by Kafka"), "{reason}");

    // Acknowledged at last: the flush goes through when its retry wait is over.
    fx.unconfirmed.set(false);
    std::thread::sleep(state.retry_in() + Duration::from_millis(1));
    assert!(state.flush_due());
    assert_eq!(flush_all(&mut state, &fx), Some(false));
    assert_eq!(store.watermark_offset("p1:a"), Some(0));
    assert_eq!(fx.committed(), [(0, 1)]);
    assert!(ready.check().is_ok());
}

#[test]
fn readiness_follows_writes_even_while_reads_work() {
    let store = MemoryStore::default();
    let ready = Readiness::new("test");
    let mut state = state_ready(&store, settings(1_000, Duration::from_secs(3600)), &ready);
    state.positions.assign(&[0]);
    read(&mut state, 0, 0, &[cart("a", 0, "1")]);
    store.stored().refuse_bulk = true;
    assert_eq!(flush_all(&mut state, &Recorder::default()), Some(true));
    // An mget that works afterwards does not make it ready.
    read(&mut state, 0, 1, &[cart("b", 1, "1")]);
    let reason = ready.check().expect_err("not ready");
    assert!(reason.contains("_bulk"), "{reason}");
    store.stored().refuse_bulk = false;
    assert_eq!(flush_all(&mut state, &Recorder::default()), Some(false));
    assert!(ready.check().is_ok());
}

#[test]
fn a_flush_that_must_get_through_is_not_reported_done_when_its_commit_failed() {
    let store = MemoryStore::default();
    let mut state = state(&store);
    state.positions.assign(&[0]);
    read(&mut state, 0, 0, &[cart("a", 0, "1")]);
    let fx = Recorder {
        crash_before_commit: true,
        ..Recorder::default()
    };
    assert!(
        !state.flush_now(&fx, &[0], 2),
        "the commit never went through"
    );
    assert_eq!(store.watermark_offset("p1:a"), Some(0), "the documents did");
    let fx = Recorder::default();
    assert!(state.flush_now(&fx, &[0], 2));
    assert_eq!(fx.committed(), [(0, 1)]);
}

#[test]
fn a_store_known_empty_is_asked_only_for_the_profiles_written_to_it() {
    let store = MemoryStore::default();
    // Evict everything clean at once, so the second event must reload its profile.
    let mut state = state_with(&store, settings(0, Duration::ZERO));
    state.assume_store_empty();
    state.positions.assign(&[0]);
    let fx = Recorder::default();

    assert!(state.load_absent(["p1:a"].into_iter()));
    assert!(store.stored().asked.is_empty(), "nothing is stored yet");
    let now = std::time::Instant::now();
    state.fold(&cart("a", 0, "5"), "p1:a".into(), 0, 0, now);
    state.positions.handled(0, 0);
    assert_eq!(flush_all(&mut state, &fx), Some(false));
    assert!(!state.cache.contains("p1:a"), "evicted once stored");

    assert!(state.load_absent(["p1:a", "p1:b"].into_iter()));
    assert_eq!(
        store.stored().asked,
        ["p1:a"],
        "the profile written is loaded again; one never written is not asked for"
    );
    state.fold(&cart("a", 1, "5"), "p1:a".into(), 0, 1, now);
    state.positions.handled(0, 1);
    flush_all(&mut state, &fx);
    assert_eq!(
        store.doc("p1:a").map(|d| d["cart_amount"].clone()),
        Some("10".into()),
        "the reloaded profile adds to its stored cart"
    );
}

// ------------------------------------------------------------------ identity rules

mod identity_rules {
    use std::sync::Arc;
    use std::time::Instant;

    use pulse_core::identity::{Forward, IdentityRecord, Link, Merge, Position, Unlink};

    use super::*;
    use crate::engine::identity::{Read, Replay, Unifier, Writes};
    use crate::identity::{refusal, IdentityPolicy};

    /// The records the rules send, recorded; folds as a replay does.
    #[derive(Default)]
    struct Sent(Vec<IdentityRecord>);

    impl Writes<MemoryStore> for &mut Sent {
        fn send(&mut self, record: &IdentityRecord) {
            self.0.push(record.clone());
        }

        fn fold(
            &mut self,
            state: &mut ProfileState<MemoryStore>,
            event: &Event,
            id: String,
            read: Read,
        ) -> Option<String> {
            Writes::<MemoryStore>::fold(&mut Replay, state, event, id, read)
        }
    }

    fn at(offset: i64) -> Read {
        Read {
            partition: 0,
            offset,
            clock: Instant::now(),
            now_ms: 0,
        }
    }

    fn event(json: &str) -> Event {
        parse_event(json, &ParseContext::now()).expect("a valid event")
    }

    fn both(n: usize) -> Event {
        event(&format!(
            r#"{{"event":"page_view","partner_id":"p1","user_id":"u1","anonymous_id":"a1","message_id":"m{n}"}}"#
        ))
    }

    fn links(sent: &Sent) -> usize {
        sent.0
            .iter()
            .filter(|r| matches!(r, IdentityRecord::Link(_)))
            .count()
    }

    fn merge() -> IdentityRecord {
        IdentityRecord::Merge(Merge {
            partner_id: "p1".into(),
            anonymous_id: "a1".into(),
            user_id: "u1".into(),
            linked_at: chrono::Utc::now(),
            source: Position {
                partition: 1,
                offset: 7,
            },
            profile: None,
        })
    }

    #[test]
    fn a_person_asks_once_and_once_more_per_load_until_answered() {
        let (store, mut sent) = (MemoryStore::default(), Sent::default());
        let mut state = state(&store);
        let policy = IdentityPolicy::default();
        let mut rules = Unifier {
            state: &mut state,
            policy: &policy,
            erasures: &Erasures::default(),
            writes: &mut sent,
        };
        rules.event(both(0), "p1:u1".into(), at(0));
        // No answer yet (a backlog): the next event with both ids does not ask again.
        rules.event(both(1), "p1:u1".into(), at(1));
        assert_eq!(links(&sent), 1, "{:?}", sent.0);
        // Loaded by another process (a restart, a promoted recompute whose history had no
        // link written for it): asked once more, then no more.
        let kinds = crate::models::registry();
        let doc = state
            .cache
            .get("p1:u1")
            .expect("the person")
            .to_document(&kinds, chrono::Utc::now());
        let loaded = crate::profile::Profile::from_document(&doc, &kinds).expect("readable");
        state.cache.insert_loaded(loaded, Instant::now());
        let mut rules = Unifier {
            state: &mut state,
            policy: &policy,
            erasures: &Erasures::default(),
            writes: &mut sent,
        };
        rules.event(both(2), "p1:u1".into(), at(2));
        rules.event(both(3), "p1:u1".into(), at(3));
        rules.record(merge(), "p1:u1".into(), at(4));
        rules.event(both(4), "p1:u1".into(), at(5));
        assert_eq!(links(&sent), 2, "{:?}", sent.0);
        let identity = state.cache.get("p1:u1").and_then(|p| p.identity.clone());
        let identity = identity.expect("identity state");
        assert!(identity.pending.is_empty());
        assert_eq!(identity.aliases, ["a1"]);
    }

    #[test]
    fn an_unlinked_device_is_not_asked_for_merged_or_forwarded() {
        let (store, mut sent) = (MemoryStore::default(), Sent::default());
        let mut state = state(&store);
        let mut unlinks = crate::unlinks::Unlinks::default();
        unlinks.insert(Unlink {
            partner_id: "p1".into(),
            anonymous_id: "a1".into(),
            user_id: "u1".into(),
            unlinked_at: chrono::Utc::now(),
        });
        let policy = IdentityPolicy {
            unlinks: Arc::new(unlinks),
            ..IdentityPolicy::default()
        };
        let mut rules = Unifier {
            state: &mut state,
            policy: &policy,
            erasures: &Erasures::default(),
            writes: &mut sent,
        };
        let device_event = event(
            r#"{"event":"page_view","partner_id":"p1","anonymous_id":"a1","message_id":"d0"}"#,
        );
        rules.event(device_event.clone(), "p1:a1".into(), at(0));
        // The person does not ask.
        rules.event(both(0), "p1:u1".into(), at(1));
        // A link already on its way is refused by the device, which stays a profile.
        let link = IdentityRecord::Link(Link {
            partner_id: "p1".into(),
            anonymous_id: "a1".into(),
            user_id: "u1".into(),
            linked_at: chrono::Utc::now(),
            message_id: "m0".into(),
            origin: Position {
                partition: 0,
                offset: 1,
            },
        });
        rules.record(link, "p1:a1".into(), at(2));
        assert_eq!(links(&sent), 0);
        assert!(
            matches!(sent.0.last(), Some(IdentityRecord::Refusal(r)) if r.reason == refusal::UNLINKED),
            "{:?}",
            sent.0
        );
        // A merge or a forward already on its way is not applied to the person.
        let mut rules = Unifier {
            state: &mut state,
            policy: &policy,
            erasures: &Erasures::default(),
            writes: &mut sent,
        };
        rules.record(merge(), "p1:u1".into(), at(3));
        let forward = IdentityRecord::Forward(Forward {
            partner_id: "p1".into(),
            user_id: "u1".into(),
            source: Position {
                partition: 1,
                offset: 8,
            },
            event: Box::new(device_event),
        });
        rules.record(forward, "p1:u1".into(), at(4));
        let device = state.cache.get("p1:a1").expect("the device's profile");
        assert_eq!((device.merged_into(), device.event_count), (None, 1));
        let person = state.cache.get("p1:u1").expect("the person");
        assert_eq!(person.event_count, 1, "only its own event");
        let identity = person.identity.clone().expect("identity state");
        assert!(identity.aliases.is_empty() && identity.pending.is_empty());
        assert_eq!(identity.refused[0].reason, refusal::UNLINKED);
    }
}
