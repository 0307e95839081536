//! The speed layer's consumer loop: events in, profiles folded in memory, triggers fired at
//! once, dirty profiles flushed to Elasticsearch on the [`FlushPolicy`], offsets committed only
//! after the flush that covers them.
//!
//! Exactly-once effect: every profile document carries the (partition, offset) of the last
//! event folded into it, and is written with that offset as its external version. After a
//! crash, records are re-read from the last commit and those at or below a document's
//! watermark are skipped. A replica that loses a partition flushes and commits it in the
//! revoke callback; if it cannot (Elasticsearch down), it drops that partition's state without
//! committing, and the new owner re-reads from the last commit.
//!
//! The loop runs on its own thread with a blocking `BaseConsumer`, so the rebalance callback
//! (which runs inside `poll`) can flush synchronously before a partition is given away.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use pulse_core::Event;
use pulse_service::outbox::{Outbox, Source};
use pulse_service::{Readiness, Shutdown};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Message, OwnedHeaders, OwnedMessage};
use rdkafka::{ClientContext, Offset};
use tokio::runtime::Runtime;

use crate::config::{FlushPolicy, SpeedConfig};
use crate::dedupe::DedupePolicy;
use crate::metrics as m;
use crate::models::ModelKind;
use crate::poison::{self, PoisonJournal};
use crate::profile::{Fold, Profile, Watermark};
use crate::store::{DocWrite, ItemOutcome, ProfileStore, StoreError};
use crate::triggers::{RuleSet, TriggerMessage};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("elasticsearch: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Config(String),
    #[error("runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

struct Entry {
    profile: Profile,
    partition: i32,
    dirty: bool,
    touched: Instant,
}

/// Everything the loop and the rebalance callback share.
pub struct Engine {
    topic: String,
    dlq_topic: String,
    triggers_topic: String,
    profiles_dlq_topic: String,
    store: ProfileStore,
    runtime: Arc<Runtime>,
    kinds: Vec<ModelKind>,
    rules: RuleSet,
    policy: FlushPolicy,
    dedupe: DedupePolicy,
    max_profiles: usize,
    idle_evict: Duration,
    /// Triggers and dead letters. Infinite message timeout: librdkafka retries until the broker
    /// takes them, and offsets are committed only after `flush` saw them delivered.
    outbox: Outbox,
    /// Keys are user ids from the outside: ahash is fast and keyed per process.
    profiles: HashMap<String, Entry, ahash::RandomState>,
    /// Partition → offset of the next record to read (last handled + 1).
    positions: HashMap<i32, i64>,
    /// Partition → last committed offset.
    committed: HashMap<i32, i64>,
    /// Partitions to re-read from their last commit (a newer document was found in the store).
    rewind: HashSet<i32>,
    dirty: usize,
    last_flush: Instant,
    ready: Readiness,
    /// Records that made an earlier run panic, by position, with the panic message: they are
    /// dead-lettered instead of handled (see [`crate::poison`]).
    poison: HashMap<(i32, i64), String>,
    journal: PoisonJournal,
    /// Test-only fault injection: panic while folding this message id.
    failpoint: Option<String>,
    folded: u64,
    skipped: u64,
    duplicates: u64,
    flushes: u64,
    docs_written: u64,
    in_flight: Option<InFlight>,
    /// The waits before the next retries of a failing flush; `None` after a success.
    flush_retries: Option<Box<dyn Iterator<Item = Duration> + Send>>,
    retry_at: Instant,
    /// Stops the retries of loading profiles (a SIGTERM during an outage).
    shutdown: Shutdown,
    /// Time of the batch being processed (one clock read per batch, not per event).
    clock: Instant,
    /// Partitions this replica owns now. Records of a batch read before a revocation are
    /// dropped, not folded: their partition belongs to another replica already.
    assigned: HashSet<i32>,
}

/// A flush running in the background while consumption goes on.
struct InFlight {
    task: tokio::task::JoinHandle<Vec<Result<ItemOutcome, String>>>,
    /// The documents, shared with the task: one refused for good goes to the dead-letter topic.
    writes: Arc<Vec<DocWrite>>,
    /// (profile id, partition) per document, in write order.
    ids: Vec<(String, i32)>,
    /// Read positions when the flush started: what it may commit.
    positions: Vec<(i32, i64)>,
    started: Instant,
}

/// Writes documents in `_bulk` chunks, two requests at a time; one outcome per document.
async fn write_all(
    store: &ProfileStore,
    writes: &[DocWrite],
    chunk: usize,
) -> Vec<Result<ItemOutcome, String>> {
    let mut out = Vec::with_capacity(writes.len());
    for pair in writes.chunks(chunk * 2) {
        let (a, b) = pair.split_at(pair.len().min(chunk));
        let (ra, rb) = tokio::join!(store.bulk_write(a), store.bulk_write(b));
        for (docs, result) in [(a, ra), (b, rb)] {
            match result {
                Ok(outcomes) => out.extend(outcomes.into_iter().map(Ok)),
                Err(e) => out.extend(docs.iter().map(|_| Err(e.to_string()))),
            }
        }
    }
    out
}

/// The consumer context: routes revocations to the engine.
pub struct SpeedContext {
    engine: Arc<Mutex<Engine>>,
}

impl ClientContext for SpeedContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if !pulse_core::kafka::is_end_of_partition(&error) {
            tracing::error!(%error, reason, "kafka client error");
        }
    }
}

impl ConsumerContext for SpeedContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            let lost = consumer.assignment_lost();
            tracing::info!(?partitions, lost, "partitions revoked");
            let mut engine = lock(&self.engine);
            for p in &partitions {
                engine.assigned.remove(p);
            }
            engine.give_up(consumer, &partitions, lost);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?partitions, "partitions assigned");
            lock(&self.engine).assigned.extend(partitions);
        }
    }
}

fn lock(engine: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    engine.lock().unwrap_or_else(|p| p.into_inner())
}

type SpeedConsumer = BaseConsumer<SpeedContext>;

/// Runs the speed layer until `stop` is set, then flushes, commits and leaves the group.
pub fn run(
    config: &SpeedConfig,
    stop: Shutdown,
    ready: Readiness,
) -> Result<RunSummary, EngineError> {
    let journal = config.poison_journal();
    let poison = journal.load();
    if !poison.is_empty() {
        tracing::warn!(records = poison.len(), journal = %journal.path().display(),
            "records that made an earlier run panic will be dead-lettered");
    }
    crate::models::windowed_gender::set_window_days(config.window_days);
    let kinds = crate::models::select(&config.models).map_err(EngineError::Config)?;
    let rules = match &config.rules_file {
        Some(path) => RuleSet::load(path).map_err(|e| EngineError::Config(e.to_string()))?,
        None => RuleSet::default(),
    };
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
    );
    let store = ProfileStore::new(&config.es)?;
    let engine = Arc::new(Mutex::new(Engine {
        topic: config.topics.events.clone(),
        dlq_topic: config.topics.dlq.clone(),
        triggers_topic: config.topics.triggers.clone(),
        profiles_dlq_topic: config.topics.profiles_dlq.clone(),
        store,
        runtime,
        kinds,
        rules,
        policy: config.flush.clone(),
        dedupe: config.dedupe.clone(),
        max_profiles: config.max_profiles,
        idle_evict: Duration::from_secs(config.idle_evict_secs),
        outbox: Outbox::new(config.kafka.producer_config(), "speed")?,
        profiles: HashMap::default(),
        positions: HashMap::new(),
        committed: HashMap::new(),
        rewind: HashSet::new(),
        dirty: 0,
        last_flush: Instant::now(),
        ready,
        poison,
        journal,
        failpoint: config.failpoint_panic_message_id.clone(),
        folded: 0,
        skipped: 0,
        duplicates: 0,
        flushes: 0,
        docs_written: 0,
        in_flight: None,
        flush_retries: None,
        retry_at: Instant::now(),
        shutdown: stop.clone(),
        clock: Instant::now(),
        assigned: HashSet::new(),
    }));
    let mut consumer_config = config.kafka.consumer_config(&config.group);
    consumer_config.set("max.poll.interval.ms", "600000");
    if config.stop_at_end {
        consumer_config.set("enable.partition.eof", "true");
    }
    let consumer: SpeedConsumer = consumer_config.create_with_context(SpeedContext {
        engine: engine.clone(),
    })?;
    consumer.subscribe(&[&config.topics.events])?;
    tracing::info!(topic = %config.topics.events, group = %config.group, rules = lock(&engine).rules.rules.len(), "speed layer consuming");

    let mut batch: Vec<OwnedMessage> = Vec::with_capacity(config.max_batch);
    let mut at_end: HashSet<i32> = HashSet::new();
    let started_at = Instant::now();
    while !stop.is_stopped() {
        batch.clear();
        let started = Instant::now();
        // The first poll waits for data; then take what is already there, briefly, so one
        // mget serves many records without holding back a trigger noticeably.
        while batch.len() < config.max_batch {
            let timeout = if batch.is_empty() {
                Duration::from_millis(100)
            } else if started.elapsed() < Duration::from_millis(20) {
                Duration::ZERO
            } else {
                break;
            };
            match consumer.poll(timeout) {
                Some(Ok(msg)) => {
                    at_end.remove(&msg.partition());
                    batch.push(msg.detach());
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                None => break,
            }
        }
        let mut engine = lock(&engine);
        engine.ready.beat();
        if !batch.is_empty() {
            engine.process(&batch);
        }
        engine.finish_flush(&consumer, false);
        engine.apply_rewinds(&consumer);
        // Also due when only positions moved (duplicates, dead letters): their offsets must
        // be committed too, or the lag never shrinks and a restart re-reads them.
        let since = engine.last_flush.elapsed();
        let due = engine.policy.is_due(since, engine.dirty)
            || (since >= engine.policy.interval() && engine.has_uncommitted());
        if due && engine.in_flight.is_none() && Instant::now() >= engine.retry_at {
            let partitions: Vec<i32> = engine.positions.keys().copied().collect();
            engine.start_flush(&partitions);
        }
        // Back-pressure: with too many unflushed profiles (Elasticsearch slow or down), stop
        // reading until a flush gets through. Lag grows; memory does not.
        while engine.dirty >= engine.policy.max_dirty && !stop.is_stopped() {
            if engine.finish_flush(&consumer, true).is_none() {
                let partitions: Vec<i32> = engine.positions.keys().copied().collect();
                let wait = engine.retry_at.saturating_duration_since(Instant::now());
                if !stop.sleep_blocking(wait) {
                    break;
                }
                engine.start_flush(&partitions);
            }
        }
        drop(engine);
        if config.stop_at_end && batch.is_empty() && all_read(&consumer, &at_end) {
            tracing::info!("every assigned partition read to its end");
            break;
        }
    }
    tracing::info!("stopping: final flush and commit");
    let mut engine_guard = lock(&engine);
    let partitions: Vec<i32> = engine_guard.positions.keys().copied().collect();
    // Eight tries wait at most 12.7 s in all (100 ms doubling, jittered down): within the
    // 30 s an orchestrator gives a stopping pod, and a flush given up is only re-read later.
    if !engine_guard.flush_now(&consumer, &partitions, 8) {
        tracing::error!("giving up the final flush; records since the last commit will be re-read");
    }
    let summary = RunSummary {
        elapsed_secs: started_at.elapsed().as_secs_f64(),
        events_folded: engine_guard.folded,
        events_skipped: engine_guard.skipped,
        events_duplicate: engine_guard.duplicates,
        flushes: engine_guard.flushes,
        docs_written: engine_guard.docs_written,
        profiles_in_memory: engine_guard.profiles.len(),
        peak_rss_kb: peak_rss_kb(),
    };
    drop(engine_guard);
    consumer.unsubscribe();
    Ok(summary)
}

/// What a run did, printed by `pulse-speed run` on exit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    pub elapsed_secs: f64,
    pub events_folded: u64,
    pub events_skipped: u64,
    /// Client retries recognised by message id and not folded again.
    pub events_duplicate: u64,
    pub flushes: u64,
    pub docs_written: u64,
    pub profiles_in_memory: usize,
    pub peak_rss_kb: Option<u64>,
}

/// Peak resident memory of this process (Linux), for the memory-per-profile figure.
fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn all_read(consumer: &SpeedConsumer, at_end: &HashSet<i32>) -> bool {
    let Ok(assignment) = consumer.assignment() else {
        return false;
    };
    assignment.count() > 0
        && assignment
            .elements()
            .iter()
            .all(|e| at_end.contains(&e.partition()))
}

impl Engine {
    /// Folds a batch of records: one mget for the profiles not in memory, then each record in
    /// order.
    fn process(&mut self, batch: &[OwnedMessage]) {
        self.clock = Instant::now();
        let mut parsed: Vec<(&OwnedMessage, Decoded)> = Vec::with_capacity(batch.len());
        let mut missing: Vec<String> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        for msg in batch {
            if self.rewind.contains(&msg.partition()) || !self.assigned.contains(&msg.partition()) {
                continue;
            }
            poison::working_on(msg.partition(), msg.offset());
            let poisoned = if self.poison.is_empty() {
                None
            } else {
                self.poison.get(&(msg.partition(), msg.offset()))
            };
            let result = match poisoned {
                Some(reason) => Err(format!(
                    "this record made pulse-speed panic ({reason}); dead-lettered on the restart"
                )),
                None => decode(msg),
            };
            if let Ok((_, id)) = &result {
                if !self.profiles.contains_key(id) && seen.insert(id.clone()) {
                    missing.push(id.clone());
                }
            }
            parsed.push((msg, result));
        }
        // Loading is not any one record's doing.
        poison::idle();
        if !self.load(&missing) {
            // Stopping during an outage: nothing of the batch is folded or passed, so it is
            // read again after the restart.
            return;
        }
        let now_ms = Utc::now().timestamp_millis();
        let (folded, skipped, duplicates) = (self.folded, self.skipped, self.duplicates);
        for (msg, result) in parsed {
            let partition = msg.partition();
            if self.rewind.contains(&partition) {
                continue;
            }
            poison::working_on(partition, msg.offset());
            let refused = match result {
                Ok((event, id)) => self.fold(&event, id, partition, msg.offset(), now_ms),
                Err(reason) => Some(reason),
            };
            if let Some(reason) = refused {
                self.dead_letter(msg, &reason);
            }
            self.positions.insert(partition, msg.offset() + 1);
        }
        poison::idle();
        // Metrics per batch, not per event: a registry lookup per event costs real throughput.
        metrics::counter!(m::EVENTS_FOLDED).increment(self.folded - folded);
        metrics::counter!(m::EVENTS_SKIPPED).increment(self.skipped - skipped);
        metrics::counter!(m::EVENTS_DUPLICATE).increment(self.duplicates - duplicates);
        metrics::gauge!(m::PROFILES_IN_MEMORY).set(self.profiles.len() as f64);
        metrics::gauge!(m::PROFILES_DIRTY).set(self.dirty as f64);
    }

    /// Folds one event and fires its triggers; returns the dead-letter reason of an event
    /// that cannot be folded.
    fn fold(
        &mut self,
        event: &Event,
        id: String,
        partition: i32,
        offset: i64,
        now_ms: i64,
    ) -> Option<String> {
        let kinds = &self.kinds;
        let entry = self.profiles.entry(id).or_insert_with(|| Entry {
            profile: Profile::new(event, kinds),
            partition,
            dirty: false,
            touched: self.clock,
        });
        if self.failpoint.as_deref() == Some(event.message_id.as_str()) {
            panic!("failpoint: folding message_id {}", event.message_id);
        }
        entry.touched = self.clock;
        // A profile loaded from the store belongs to the partition its events come from.
        entry.partition = partition;
        match entry
            .profile
            .fold(event, Watermark { partition, offset }, &self.dedupe)
        {
            Fold::Skipped => {
                self.skipped += 1;
                return None;
            }
            // A client retry: folded once already, and its triggers fired then.
            Fold::Duplicate => {
                self.duplicates += 1;
                return None;
            }
            Fold::Refused(reason) => return Some(reason),
            Fold::Applied => {
                self.folded += 1;
                if !entry.dirty {
                    entry.dirty = true;
                    self.dirty += 1;
                }
            }
        }
        // Fired now, not at flush: a marketer's trigger must not wait 30 s. A re-read event
        // fires again with the same idempotency key; the notifier delivers it once.
        for rule in self.rules.matching(event) {
            let message = TriggerMessage::new(rule, event, now_ms);
            let payload = serde_json::to_vec(&message).unwrap_or_default();
            let key = message.key();
            self.outbox.send(
                &self.triggers_topic,
                key.as_bytes(),
                &payload,
                OwnedHeaders::new(),
            );
            metrics::counter!(m::TRIGGERS_FIRED, "rule" => rule.id.clone()).increment(1);
        }
        None
    }

    /// A record we cannot use goes to the dead-letter topic with the reason and its origin.
    fn dead_letter(&self, msg: &OwnedMessage, reason: &str) {
        tracing::warn!(
            partition = msg.partition(),
            offset = msg.offset(),
            reason,
            "record to dead-letter topic"
        );
        metrics::counter!(m::EVENTS_DEAD_LETTERED).increment(1);
        let source = Source {
            topic: msg.topic(),
            partition: msg.partition(),
            offset: msg.offset(),
        };
        self.outbox.dead_letter(
            &self.dlq_topic,
            source,
            msg.key().unwrap_or_default(),
            msg.payload().unwrap_or_default(),
            reason,
            &[],
        );
    }

    /// A profile document Elasticsearch refused for good, with the reason, the event that
    /// last changed it as its source (the document's version is that offset) and the index,
    /// so it can be written again once the cause is fixed.
    fn dead_letter_document(&self, write: &DocWrite, partition: i32, reason: &str) {
        let source = Source {
            topic: &self.topic,
            partition,
            offset: write.version,
        };
        self.outbox.dead_letter(
            &self.profiles_dlq_topic,
            source,
            write.id.as_bytes(),
            &write.doc,
            reason,
            &[("pulse.index", self.store.alias())],
        );
    }

    /// Loads profiles from Elasticsearch (batched mget), retrying while it is unavailable:
    /// a profile is never assumed new just because the store did not answer. `false` when
    /// the process stopped before Elasticsearch answered.
    fn load(&mut self, ids: &[String]) -> bool {
        for chunk in ids.chunks(1000) {
            let (store, ready) = (&self.store, &self.ready);
            let loaded = self.runtime.block_on(self.policy.retry().run(
                &self.shutdown,
                "loading profiles",
                |_| true,
                || async move {
                    let docs = store.mget(chunk).await;
                    ready.set_healthy(docs.is_ok());
                    docs
                },
            ));
            let Ok(docs) = loaded else {
                return false;
            };
            metrics::counter!(m::PROFILES_LOADED).increment(docs.len() as u64);
            for (id, doc) in docs {
                match Profile::from_document(&doc, &self.kinds) {
                    Ok(profile) => {
                        let partition = profile.watermark.map_or(-1, |w| w.partition);
                        self.profiles.insert(
                            id,
                            Entry {
                                profile,
                                partition,
                                dirty: false,
                                touched: Instant::now(),
                            },
                        );
                    }
                    Err(e) => {
                        tracing::error!(id, error = %e, "stored profile unreadable; it will be rebuilt from new events only")
                    }
                }
            }
        }
        true
    }

    /// Starts writing the dirty profiles of `partitions` in the background, unless a flush is
    /// already in flight. The documents and the read positions are snapshotted now: events
    /// folded while the write runs are not in it, and their offsets are not committed by it.
    fn start_flush(&mut self, partitions: &[i32]) {
        if self.in_flight.is_some() {
            return;
        }
        let now = Utc::now();
        let wanted: HashSet<i32> = partitions.iter().copied().collect();
        let mut writes = Vec::new();
        for entry in self.profiles.values_mut() {
            if entry.dirty && wanted.contains(&entry.partition) {
                entry.dirty = false;
                writes.push(DocWrite {
                    id: entry.profile.id.clone(),
                    version: entry.profile.watermark.map_or(0, |w| w.offset),
                    doc: serde_json::to_vec(&entry.profile.to_document(&self.kinds, now))
                        .unwrap_or_default(),
                });
            }
        }
        self.dirty -= writes.len();
        let positions: Vec<(i32, i64)> = partitions
            .iter()
            .filter_map(|p| self.positions.get(p).map(|o| (*p, *o)))
            .collect();
        let ids: Vec<(String, i32)> = writes
            .iter()
            .map(|w| {
                let partition = self.profiles.get(&w.id).map_or(-1, |e| e.partition);
                (w.id.clone(), partition)
            })
            .collect();
        let store = self.store.clone();
        let chunk = self.policy.bulk_docs.max(1);
        let writes = Arc::new(writes);
        let shared = writes.clone();
        let task = self
            .runtime
            .spawn(async move { write_all(&store, &shared, chunk).await });
        self.in_flight = Some(InFlight {
            task,
            writes,
            ids,
            positions,
            started: Instant::now(),
        });
    }

    /// Completes the flush in flight if it is done (or waits for it with `wait`): failed
    /// profiles become dirty again, and partitions whose profiles are all written are
    /// committed up to the snapshotted positions. Returns whether the flush failed.
    fn finish_flush(&mut self, consumer: &SpeedConsumer, wait: bool) -> Option<bool> {
        let done = self.in_flight.as_ref()?.task.is_finished();
        if !done && !wait {
            return None;
        }
        let flight = self.in_flight.take()?;
        let outcomes = self
            .runtime
            .block_on(flight.task)
            .unwrap_or_else(|e| vec![Err(format!("flush task failed: {e}")); flight.ids.len()]);
        let mut failed: HashSet<i32> = HashSet::new();
        let mut first_error = None;
        for (((id, partition), outcome), write) in
            flight.ids.iter().zip(outcomes).zip(flight.writes.iter())
        {
            match outcome {
                Ok(ItemOutcome::Written) => self.docs_written += 1,
                Ok(ItemOutcome::Stale) => {
                    // Someone wrote a newer version: our state is behind. Re-read the partition
                    // from its last commit on top of the stored documents.
                    metrics::counter!(m::DOCS_STALE).increment(1);
                    tracing::warn!(%id, partition, "stored profile is newer; re-reading partition");
                    self.rewind.insert(*partition);
                }
                Ok(ItemOutcome::Rejected(reason)) => {
                    // Not retried forever (one bad document must not hold back every other
                    // profile of its partition) and not dropped: the document goes to the
                    // profiles dead-letter topic, which the commit below waits for.
                    metrics::counter!(m::DOCS_REJECTED).increment(1);
                    tracing::error!(%id, reason, "elasticsearch rejected profile document; to dead-letter topic");
                    self.dead_letter_document(write, *partition, &reason);
                }
                Ok(ItemOutcome::Retry(reason)) | Err(reason) => {
                    failed.insert(*partition);
                    first_error.get_or_insert(reason);
                    if let Some(entry) = self.profiles.get_mut(id) {
                        if !entry.dirty {
                            entry.dirty = true;
                            self.dirty += 1;
                        }
                    }
                }
            }
        }
        self.flushes += 1;
        metrics::counter!(m::FLUSHES).increment(1);
        metrics::histogram!(m::FLUSH_SECONDS).record(flight.started.elapsed().as_secs_f64());
        tracing::info!(docs = flight.ids.len(), took = ?flight.started.elapsed(), failed = failed.len(), "flushed");
        if let Some(e) = &first_error {
            let policy = self.policy.retry();
            let wait = self
                .flush_retries
                .get_or_insert_with(|| Box::new(policy.delays()))
                .next()
                .unwrap_or(policy.max);
            self.retry_at = Instant::now() + wait;
            self.ready.set_healthy(false);
            metrics::counter!(m::FLUSH_FAILURES).increment(1);
            tracing::warn!(error = %e, retry_in = ?wait, dirty = self.dirty, "flush failed");
        } else {
            self.flush_retries = None;
            self.ready.set_healthy(true);
        }
        // Triggers and dead letters of the records about to be committed must be in Kafka.
        if let Err(e) = self.outbox.flush(Duration::from_secs(30)) {
            tracing::warn!(error = %e, "triggers/dead letters not acknowledged yet; not committing");
            return Some(true);
        }
        let commit: Vec<(i32, i64)> = flight
            .positions
            .into_iter()
            .filter(|(p, _)| !failed.contains(p) && !self.rewind.contains(p))
            .collect();
        self.commit(consumer, &commit);
        self.last_flush = Instant::now();
        self.evict();
        Some(first_error.is_some())
    }

    /// Flushes now and waits, retrying with backoff up to `attempts` times. For revocation and
    /// shutdown, where the caller must know the outcome before going on.
    fn flush_now(&mut self, consumer: &SpeedConsumer, partitions: &[i32], attempts: u32) -> bool {
        self.finish_flush(consumer, true);
        // Bounded, and not cut short by a stop: this is the flush a stop asks for.
        let mut waits = self
            .policy
            .retry()
            .with_attempts(attempts as usize)
            .delays();
        loop {
            self.start_flush(partitions);
            if self.finish_flush(consumer, true) != Some(true) {
                return true;
            }
            match waits.next() {
                Some(wait) => std::thread::sleep(wait),
                None => return false,
            }
        }
    }

    fn commit(&mut self, consumer: &SpeedConsumer, positions: &[(i32, i64)]) {
        let tpl = pulse_service::consumer::commit_list(
            &self.topic,
            positions
                .iter()
                .copied()
                .filter(|(p, next)| self.committed.get(p) != Some(next)),
        );
        if tpl.count() == 0 {
            return;
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                for e in tpl.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        self.committed.insert(e.partition(), o);
                    }
                }
                self.forget_committed_poison();
            }
            // Lost the partitions meanwhile: the new owner re-reads; watermarks keep it exact.
            Err(e) => tracing::warn!(error = %e, "commit failed"),
        }
    }

    /// Whether some partition was read past its last commit.
    fn has_uncommitted(&self) -> bool {
        self.positions
            .iter()
            .any(|(p, o)| self.committed.get(p) != Some(o))
    }

    /// Drops journaled poison records whose offset is committed: they were dead-lettered and
    /// will not be read again.
    fn forget_committed_poison(&mut self) {
        let committed = &self.committed;
        let done: Vec<(i32, i64)> = self
            .poison
            .keys()
            .filter(|(p, o)| committed.get(p).is_some_and(|c| *o < *c))
            .copied()
            .collect();
        if !done.is_empty() {
            for key in &done {
                self.poison.remove(key);
            }
            if let Err(e) = self.journal.forget(&done) {
                tracing::warn!(error = %e, journal = %self.journal.path().display(), "rewriting the poison journal failed");
            }
        }
    }

    /// Partitions are being revoked: flush and commit them if possible, then forget them. If
    /// the assignment is already lost, or Elasticsearch will not take the flush, drop their
    /// state uncommitted: the next owner re-reads from the last commit.
    fn give_up(&mut self, consumer: &SpeedConsumer, partitions: &[i32], lost: bool) {
        self.finish_flush(consumer, true);
        if !lost && !self.flush_now(consumer, partitions, 5) {
            tracing::error!("could not flush revoked partitions; the next owner re-reads them");
        }
        self.forget(partitions);
    }

    fn forget(&mut self, partitions: &[i32]) {
        let gone: HashSet<i32> = partitions.iter().copied().collect();
        let before = self.profiles.len();
        let mut dirty_dropped = 0;
        self.profiles.retain(|_, e| {
            let keep = !gone.contains(&e.partition);
            if !keep && e.dirty {
                dirty_dropped += 1;
            }
            keep
        });
        self.dirty -= dirty_dropped;
        for p in partitions {
            self.positions.remove(p);
            self.committed.remove(p);
        }
        tracing::info!(
            dropped = before - self.profiles.len(),
            dirty_dropped,
            "forgot revoked partitions"
        );
    }

    /// Re-reads rewound partitions from their last commit, with their profiles reloaded.
    fn apply_rewinds(&mut self, consumer: &SpeedConsumer) {
        if self.rewind.is_empty() {
            return;
        }
        let partitions: Vec<i32> = self.rewind.drain().collect();
        let committed: Vec<(i32, Option<i64>)> = partitions
            .iter()
            .map(|p| (*p, self.committed.get(p).copied()))
            .collect();
        self.forget(&partitions);
        for (p, offset) in committed {
            let to = offset.map_or(Offset::Stored, Offset::Offset);
            if let Err(e) = consumer.seek(&self.topic, p, to, Duration::from_secs(10)) {
                tracing::error!(partition = p, error = %e, "seek for re-read failed");
            }
            if let Some(o) = offset {
                self.committed.insert(p, o);
            }
        }
    }

    /// Evicts clean profiles idle past the threshold, and the oldest clean ones beyond the
    /// memory bound. Dirty profiles are never evicted: they are not in Elasticsearch yet.
    fn evict(&mut self) {
        let before = self.profiles.len();
        let idle = self.idle_evict;
        self.profiles
            .retain(|_, e| e.dirty || e.touched.elapsed() < idle);
        if self.profiles.len() > self.max_profiles {
            let mut clean: Vec<(Instant, String)> = self
                .profiles
                .iter()
                .filter(|(_, e)| !e.dirty)
                .map(|(k, e)| (e.touched, k.clone()))
                .collect();
            clean.sort();
            let excess = self.profiles.len() - self.max_profiles;
            for (_, k) in clean.into_iter().take(excess) {
                self.profiles.remove(&k);
            }
        }
        let evicted = before - self.profiles.len();
        if evicted > 0 {
            metrics::counter!(m::EVICTIONS).increment(evicted as u64);
        }
        metrics::gauge!(m::PROFILES_IN_MEMORY).set(self.profiles.len() as f64);
        metrics::gauge!(m::PROFILES_DIRTY).set(self.dirty as f64);
    }
}

/// A record's event and profile id, or why it is not usable.
type Decoded = Result<(Event, String), String>;

/// The canonical event of a record and its profile id, or why it is not usable.
fn decode(msg: &OwnedMessage) -> Decoded {
    let event = Event::from_record(msg.key(), msg.payload())?;
    let id = event.partition_key();
    Ok((event, id))
}
