//! The speed layer's state, without Kafka: the profiles of the owned partitions, their read
//! positions and the flush in flight, and the rules that tie them together:
//!
//! - a position is committed only after the flush that covers it stored every profile its
//!   events changed (and the triggers and dead letters of those events are acknowledged);
//! - a partition whose stored profile turned out newer (409) is re-read from its last commit
//!   (or the first record read since its assignment), on top of the stored documents, and not
//!   committed meanwhile;
//! - a revoked partition is flushed and committed if possible, then forgotten;
//! - a dirty profile is never evicted.
//!
//! It reaches the store through [`DocumentStore`] and Kafka through [`Effects`], so these
//! rules are unit-tested against an in-memory store (see `tests.rs`). Its loading and folding
//! are in `records.rs`, its revocations and re-reads in `rebalance.rs`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use pulse_service::consumer::{Commit, Positions};
use pulse_service::{Condition, Readiness, Shutdown};
use tokio::runtime::Runtime;

use super::cache::ProfileCache;
use super::flush::{Flusher, Pending};
use crate::config::FlushPolicy;
use crate::dedupe::DedupePolicy;
use crate::metrics as m;
use crate::models::ModelKind;
use crate::store::{DocWrite, DocumentStore};

/// What the state needs of Kafka besides commits.
pub(crate) trait Effects: Commit {
    /// A document the store refused for good goes to the profiles dead-letter topic.
    fn dead_letter_document(&self, write: &DocWrite, partition: i32, reason: &str);
    /// Waits until every trigger and dead letter sent so far is acknowledged: the records
    /// behind them may be committed only then.
    fn confirm(&self) -> Result<(), String>;
    /// Whether the side outputs can never be confirmed again (a fatal producer error): a
    /// flush that must get through stops trying.
    fn failed_for_good(&self) -> bool {
        false
    }
}

/// How the state folds, flushes and evicts.
#[derive(Clone)]
pub(crate) struct Settings {
    pub kinds: Vec<ModelKind>,
    pub dedupe: DedupePolicy,
    pub policy: FlushPolicy,
    pub max_profiles: usize,
    pub idle_evict: Duration,
}

impl Settings {
    /// The settings `config` asks for: the models, dedupe, flush and memory rules. Every
    /// process that folds profiles (the live layer, a recompute) takes them from here, so the
    /// same flags give the same profiles.
    pub fn of(config: &crate::config::SpeedConfig) -> Result<Self, super::EngineError> {
        crate::models::windowed_gender::set_window_days(config.window_days);
        Ok(Self {
            kinds: crate::models::select(&config.models).map_err(super::EngineError::Config)?,
            dedupe: config.dedupe.clone(),
            policy: config.flush.clone(),
            max_profiles: config.max_profiles,
            idle_evict: Duration::from_secs(config.idle_evict_secs),
        })
    }
}

/// What the state did, for the run summary.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counts {
    pub folded: u64,
    pub skipped: u64,
    pub duplicates: u64,
    pub flushes: u64,
    pub docs_written: u64,
}

pub(crate) struct ProfileState<S> {
    pub cache: ProfileCache,
    pub positions: Positions,
    pub counts: Counts,
    pub(super) flusher: Flusher<S>,
    pub(super) runtime: Arc<Runtime>,
    pub(super) settings: Settings,
    /// Partitions to re-read from their last commit (a newer document was found in the store).
    pub(super) rewind: HashSet<i32>,
    last_flush: Instant,
    pub(super) health: Health,
    /// Stops the retries of loading profiles (a SIGTERM during an outage).
    pub(super) shutdown: Shutdown,
    /// Set when the store was empty when this process began (an index a recompute just
    /// created): the ids it has sent to the store since. Any other profile cannot be there, so
    /// loading it is skipped.
    pub(super) written: Option<WrittenIds>,
}

/// The ids a process has written to a store that was empty, as hashes: a collision only
/// costs a load that finds nothing, never a profile taken as new while it is stored. Eight
/// bytes per profile, where the ids would take a string each.
#[derive(Default)]
pub(super) struct WrittenIds {
    hashes: HashSet<u64>,
    hasher: std::hash::RandomState,
}

impl WrittenIds {
    fn insert(&mut self, id: &str) {
        self.hashes.insert(self.hash(id));
    }

    /// Whether `id` may be in the store.
    pub(super) fn may_hold(&self, id: &str) -> bool {
        self.hashes.contains(&self.hash(id))
    }

    fn hash(&self, id: &str) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, id)
    }
}

/// The speed layer's part of readiness, one condition per dependency: a read that works must
/// not report ready while writes fail.
pub(super) struct Health {
    pub(super) reads: Condition,
    writes: Condition,
    side_outputs: Condition,
}

impl<S: DocumentStore> ProfileState<S> {
    pub fn new(
        store: S,
        runtime: Arc<Runtime>,
        settings: Settings,
        ready: &Readiness,
        shutdown: Shutdown,
    ) -> Self {
        let health = Health {
            reads: ready.condition("elasticsearch reads (mget) failing"),
            writes: ready.condition("elasticsearch writes (_bulk) failing"),
            side_outputs: ready.condition(
                "triggers or dead letters not acknowledged by Kafka; nothing is committed",
            ),
        };
        let flusher = Flusher::new(
            store,
            runtime.clone(),
            settings.policy.bulk_docs,
            settings.policy.retry(),
        );
        Self {
            cache: ProfileCache::default(),
            positions: Positions::default(),
            counts: Counts::default(),
            flusher,
            runtime,
            settings,
            rewind: HashSet::new(),
            written: None,
            last_flush: Instant::now(),
            health,
            shutdown,
        }
    }

    /// The partitions that met a stored document newer than theirs (409), in order: a live
    /// layer re-reads them, a recompute ends (see `recompute::run`).
    pub fn stale_partitions(&self) -> Vec<i32> {
        let mut stale: Vec<i32> = self.rewind.iter().copied().collect();
        stale.sort_unstable();
        stale
    }

    /// Whether records of `partition` are being dropped until its re-read starts.
    pub fn is_rewinding(&self, partition: i32) -> bool {
        self.rewind.contains(&partition)
    }

    /// Whether a flush should start now: dirty profiles past the interval or the bound,
    /// positions to commit past the interval (duplicates and dead letters move positions
    /// too, or the lag would never shrink), or a failed flush whose wait is over.
    pub fn flush_due(&self) -> bool {
        let (policy, since) = (&self.settings.policy, self.last_flush.elapsed());
        let (dirty, uncommitted) = (self.cache.dirty(), self.positions.has_uncommitted());
        let due = policy.is_due(since, dirty)
            || (since >= policy.interval() && uncommitted)
            || (self.flusher.is_retrying() && (dirty > 0 || uncommitted));
        due && self.flusher.may_start()
    }

    /// Whether a bulk load should start a flush now: none is in flight (nor waiting out a
    /// failure) and two `_bulk` requests' worth of profiles are dirty. A recompute flushes so,
    /// keeping the store writing beside the fold instead of leaving every write to its final
    /// flush; the live layer keeps its interval, which gathers a busy user's events into one
    /// write.
    pub fn eager_flush_due(&self) -> bool {
        self.flusher.may_start() && self.cache.dirty() >= 2 * self.settings.policy.bulk_docs
    }

    /// Whether reading must wait for a flush: too many profiles are not stored yet, counting
    /// those the flush in flight is writing (they are dirty again if it fails).
    pub fn over_dirty_bound(&self) -> bool {
        self.cache.dirty() + self.flusher.in_flight() >= self.settings.policy.max_dirty
    }

    pub fn retry_in(&self) -> Duration {
        self.flusher.retry_in()
    }

    /// Starts writing the dirty profiles of `partitions` in the background, unless a flush is
    /// in flight; their read positions now are what it may commit. Returns whether it started.
    ///
    /// First every trigger and dead letter sent so far must be acknowledged: the documents
    /// carry watermarks that cover their events, and an event at or below a stored watermark
    /// is skipped when it is read again after a crash, so its trigger must already be in
    /// Kafka. If they are not, no flush starts; it is tried again after the retry wait.
    pub fn start_flush(&mut self, fx: &dyn Effects, partitions: &[i32]) -> bool {
        if !self.flusher.is_idle() {
            return false;
        }
        if let Err(e) = fx.confirm() {
            self.side_outputs_failed(&e);
            return false;
        }
        self.health.side_outputs.set(true);
        let (kinds, now) = (&self.settings.kinds, Utc::now());
        let wanted: HashSet<i32> = partitions.iter().copied().collect();
        let written = &mut self.written;
        let pending = self
            .cache
            .take_dirty(&wanted, |profile| {
                // Before the write, so the set holds at least what the store may hold.
                if let Some(written) = written.as_mut() {
                    written.insert(profile.id());
                }
                DocWrite {
                    id: profile.id().to_string(),
                    version: profile.watermark.map_or(0, |w| w.offset),
                    doc: serde_json::to_vec(&profile.to_document(kinds, now)).unwrap_or_default(),
                }
            })
            .into_iter()
            .map(|(write, partition)| Pending { write, partition })
            .collect();
        self.flusher.start(pending, self.positions.of(partitions));
        true
    }

    /// Tells the state that its store holds no profile yet (a recompute's index it just
    /// created), so that it loads only the profiles it wrote itself since: a fold of history
    /// into an empty index does not ask the store for each new user in vain.
    pub fn assume_store_empty(&mut self) {
        self.written = Some(WrittenIds::default());
    }

    /// Starts a flush of every partition read.
    pub fn start_flush_all(&mut self, fx: &dyn Effects) -> bool {
        let partitions = self.positions.read();
        self.start_flush(fx, &partitions)
    }

    /// Triggers or dead letters are not acknowledged: nothing is flushed or committed until
    /// they are, and the next try waits as a failed flush does.
    fn side_outputs_failed(&mut self, error: &str) {
        self.flusher.fail();
        self.health.side_outputs.set(false);
        metrics::counter!(m::FLUSH_FAILURES).increment(1);
        tracing::warn!(error, retry_in = ?self.flusher.retry_in(), "triggers/dead letters not acknowledged; not flushing or committing");
    }

    /// Completes the flush in flight if it is done (or waits for it with `wait`): failed
    /// profiles become dirty again, refused ones are dead-lettered, and partitions whose
    /// profiles are all stored are committed up to the positions of the flush's start.
    /// `None` if no flush finished; otherwise whether it failed.
    pub fn finish_flush(&mut self, fx: &dyn Effects, wait: bool) -> Option<bool> {
        let report = self.flusher.finish(wait)?;
        self.counts.docs_written += report.written as u64;
        for id in &report.retry {
            self.cache.redirty(id);
        }
        metrics::counter!(m::DOCS_STALE).increment(report.stale_docs as u64);
        for p in &report.stale {
            tracing::warn!(
                partition = p,
                "stored profile is newer; re-reading partition"
            );
            self.rewind.insert(*p);
        }
        for (write, partition, reason) in &report.rejected {
            // Not retried forever (one bad document must not hold back every other profile
            // of its partition) and not dropped: it goes to the profiles dead-letter topic,
            // which the commit below waits for.
            metrics::counter!(m::DOCS_REJECTED).increment(1);
            tracing::error!(id = %write.id, reason, "profile document refused; to dead-letter topic");
            fx.dead_letter_document(write, *partition, reason);
        }
        self.counts.flushes += 1;
        metrics::counter!(m::FLUSHES).increment(1);
        metrics::histogram!(m::FLUSH_SECONDS).record(report.took.as_secs_f64());
        tracing::info!(docs = report.docs, took = ?report.took, failed = report.failed.len(), "flushed");
        self.health.writes.set(report.first_error.is_none());
        if let Some(e) = &report.first_error {
            metrics::counter!(m::FLUSH_FAILURES).increment(1);
            tracing::warn!(error = %e, retry_in = ?self.flusher.retry_in(), dirty = self.cache.dirty(), "flush failed");
        }
        // Dead-lettered documents, and the triggers and dead letters of records read while
        // the flush ran, are acknowledged before the commit.
        if let Err(e) = fx.confirm() {
            self.side_outputs_failed(&e);
            return Some(true);
        }
        self.health.side_outputs.set(true);
        let commit: Vec<(i32, i64)> = report
            .positions_written()
            .filter(|(p, _)| !self.rewind.contains(p))
            .collect();
        // Lost the partitions meanwhile: the new owner re-reads; watermarks keep it exact. A
        // flush whose commit failed counts as failed, so a flush that must get through (at a
        // stop, at a revocation) tries the commit again and says so if it gives up.
        let committed = self.positions.commit(fx, &commit);
        if let Err(e) = &committed {
            tracing::warn!(error = %e, "commit failed");
        }
        self.last_flush = Instant::now();
        self.evict();
        Some(report.first_error.is_some() || committed.is_err())
    }

    /// Flushes `partitions` now and waits, retrying with backoff up to `attempts` times; not
    /// cut short by a stop, since this is the flush a stop or a revocation asks for. Whether
    /// it got through.
    pub fn flush_now(&mut self, fx: &dyn Effects, partitions: &[i32], attempts: usize) -> bool {
        self.finish_flush(fx, true);
        let mut waits = self
            .settings
            .policy
            .retry()
            .with_attempts(attempts)
            .delays();
        loop {
            if self.start_flush(fx, partitions) && self.finish_flush(fx, true) == Some(false) {
                return true;
            }
            match waits.next() {
                Some(_) if fx.failed_for_good() => return false,
                Some(wait) => std::thread::sleep(wait),
                None => return false,
            }
        }
    }

    /// Evicts clean profiles idle past the threshold, and the oldest clean ones beyond the
    /// memory bound.
    fn evict(&mut self) {
        let (idle, max) = (self.settings.idle_evict, self.settings.max_profiles);
        let evicted = self.cache.evict(idle, max, Instant::now());
        if evicted > 0 {
            metrics::counter!(m::EVICTIONS).increment(evicted as u64);
        }
        self.gauges();
    }

    pub fn gauges(&self) {
        metrics::gauge!(m::PROFILES_IN_MEMORY).set(self.cache.len() as f64);
        metrics::gauge!(m::PROFILES_DIRTY).set(self.cache.dirty() as f64);
    }
}
