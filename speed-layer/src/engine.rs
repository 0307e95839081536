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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use pulse_core::Event;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Runtime;

use crate::config::{FlushPolicy, SpeedConfig};
use crate::metrics as m;
use crate::models::ModelKind;
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
    store: ProfileStore,
    runtime: Arc<Runtime>,
    kinds: Vec<ModelKind>,
    rules: RuleSet,
    policy: FlushPolicy,
    max_profiles: usize,
    idle_evict: Duration,
    /// Triggers and dead letters. Infinite message timeout: librdkafka retries until the broker
    /// takes them, and offsets are committed only after `flush` saw them delivered.
    producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    profiles: HashMap<String, Entry>,
    /// Partition → offset of the next record to read (last handled + 1).
    positions: HashMap<i32, i64>,
    /// Partition → last committed offset.
    committed: HashMap<i32, i64>,
    /// Partitions to re-read from their last commit (a newer document was found in the store).
    rewind: HashSet<i32>,
    dirty: usize,
    last_flush: Instant,
    healthy: Arc<AtomicBool>,
}

/// The consumer context: routes revocations to the engine.
pub struct SpeedContext {
    engine: Arc<Mutex<Engine>>,
}

impl ClientContext for SpeedContext {}

impl ConsumerContext for SpeedContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            let lost = consumer.assignment_lost();
            tracing::info!(?partitions, lost, "partitions revoked");
            let mut engine = lock(&self.engine);
            engine.give_up(consumer, &partitions, lost);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?partitions, "partitions assigned");
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
    stop: Arc<AtomicBool>,
    healthy: Arc<AtomicBool>,
) -> Result<(), EngineError> {
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
    let mut producer_config = config.kafka.producer_config();
    producer_config.set("message.timeout.ms", "0");
    let engine = Arc::new(Mutex::new(Engine {
        topic: config.topics.events.clone(),
        dlq_topic: config.topics.dlq.clone(),
        triggers_topic: config.topics.triggers.clone(),
        store,
        runtime,
        kinds,
        rules,
        policy: config.flush.clone(),
        max_profiles: config.max_profiles,
        idle_evict: Duration::from_secs(config.idle_evict_secs),
        producer: producer_config.create()?,
        profiles: HashMap::new(),
        positions: HashMap::new(),
        committed: HashMap::new(),
        rewind: HashSet::new(),
        dirty: 0,
        last_flush: Instant::now(),
        healthy,
    }));
    let consumer: SpeedConsumer = config
        .kafka
        .consumer_config(&config.group)
        .set("max.poll.interval.ms", "600000")
        .create_with_context(SpeedContext {
            engine: engine.clone(),
        })?;
    consumer.subscribe(&[&config.topics.events])?;
    tracing::info!(topic = %config.topics.events, group = %config.group, rules = lock(&engine).rules.rules.len(), "speed layer consuming");

    let mut batch: Vec<OwnedMessage> = Vec::with_capacity(config.max_batch);
    while !stop.load(Ordering::Relaxed) {
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
                Some(Ok(msg)) => batch.push(msg.detach()),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                None => break,
            }
        }
        let mut engine = lock(&engine);
        if !batch.is_empty() {
            engine.process(&batch);
        }
        engine.apply_rewinds(&consumer);
        if engine
            .policy
            .is_due(engine.last_flush.elapsed(), engine.dirty)
        {
            engine.flush_all(&consumer, &stop);
        }
    }
    tracing::info!("stopping: final flush and commit");
    lock(&engine).flush_all(&consumer, &stop);
    consumer.unsubscribe();
    Ok(())
}

impl Engine {
    /// Folds a batch of records: one mget for the profiles not in memory, then each record in
    /// order.
    fn process(&mut self, batch: &[OwnedMessage]) {
        let mut parsed: Vec<(&OwnedMessage, Result<Event, String>)> =
            Vec::with_capacity(batch.len());
        let mut missing: Vec<String> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        for msg in batch {
            if self.rewind.contains(&msg.partition()) {
                continue;
            }
            let result = decode(msg);
            if let Ok(e) = &result {
                let id = e.partition_key();
                if !self.profiles.contains_key(&id) && seen.insert(id.clone()) {
                    missing.push(id);
                }
            }
            parsed.push((msg, result));
        }
        self.load(&missing);
        let now_ms = Utc::now().timestamp_millis();
        for (msg, result) in parsed {
            let partition = msg.partition();
            if self.rewind.contains(&partition) {
                continue;
            }
            match result {
                Ok(event) => self.fold(&event, partition, msg.offset(), now_ms),
                Err(reason) => self.dead_letter(msg, &reason),
            }
            self.positions.insert(partition, msg.offset() + 1);
        }
        metrics::gauge!(m::PROFILES_IN_MEMORY).set(self.profiles.len() as f64);
        metrics::gauge!(m::PROFILES_DIRTY).set(self.dirty as f64);
    }

    fn fold(&mut self, event: &Event, partition: i32, offset: i64, now_ms: i64) {
        let id = event.partition_key();
        let kinds = &self.kinds;
        let entry = self.profiles.entry(id).or_insert_with(|| Entry {
            profile: Profile::new(event, kinds),
            partition,
            dirty: false,
            touched: Instant::now(),
        });
        entry.touched = Instant::now();
        // A profile loaded from the store belongs to the partition its events come from.
        entry.partition = partition;
        match entry.profile.fold(event, Watermark { partition, offset }) {
            Fold::Skipped => {
                metrics::counter!(m::EVENTS_SKIPPED).increment(1);
                return;
            }
            Fold::Applied => {
                metrics::counter!(m::EVENTS_FOLDED).increment(1);
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
            self.send(&self.triggers_topic, &key, &payload, OwnedHeaders::new());
            metrics::counter!(m::TRIGGERS_FIRED, "rule" => rule.id.clone()).increment(1);
        }
    }

    /// Sends a record, waiting out a full local queue (back-pressure, never a drop).
    fn send(&self, topic: &str, key: &str, payload: &[u8], headers: OwnedHeaders) {
        let mut record = BaseRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((e, r)) => {
                    tracing::warn!(error = %e, topic, "produce failed; retrying");
                    record = r;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
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
        let partition = msg.partition().to_string();
        let offset = msg.offset().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "pulse.error",
                value: Some(reason),
            })
            .insert(Header {
                key: "pulse.source.topic",
                value: Some(msg.topic()),
            })
            .insert(Header {
                key: "pulse.source.partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "pulse.source.offset",
                value: Some(&offset),
            })
            .insert(Header {
                key: "pulse.consumer",
                value: Some("speed"),
            });
        let key = msg
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        self.send(
            &self.dlq_topic,
            &key,
            msg.payload().unwrap_or_default(),
            headers,
        );
    }

    /// Loads profiles from Elasticsearch (batched mget), retrying while it is unavailable:
    /// a profile is never assumed new just because the store did not answer.
    fn load(&mut self, ids: &[String]) {
        for chunk in ids.chunks(1000) {
            let mut attempt = 0;
            let docs = loop {
                match self.runtime.block_on(self.store.mget(chunk)) {
                    Ok(docs) => break docs,
                    Err(e) => {
                        self.healthy.store(false, Ordering::Relaxed);
                        let wait = self.policy.backoff(attempt);
                        tracing::warn!(error = %e, retry_in = ?wait, "loading profiles failed");
                        std::thread::sleep(wait);
                        attempt += 1;
                    }
                }
            };
            self.healthy.store(true, Ordering::Relaxed);
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
    }

    /// Flushes every dirty profile, then commits. Retries with backoff while Elasticsearch is
    /// unavailable (consumption pauses, lag grows, nothing is lost).
    fn flush_all(&mut self, consumer: &SpeedConsumer, stop: &AtomicBool) {
        let partitions: Vec<i32> = self.positions.keys().copied().collect();
        let mut attempt = 0;
        loop {
            match self.flush(consumer, &partitions) {
                Ok(()) => break,
                Err(e) => {
                    self.healthy.store(false, Ordering::Relaxed);
                    let wait = self.policy.backoff(attempt);
                    tracing::warn!(error = %e, retry_in = ?wait, dirty = self.dirty, "flush failed");
                    metrics::counter!(m::FLUSH_FAILURES).increment(1);
                    std::thread::sleep(wait);
                    attempt += 1;
                    // On shutdown, give up after a while: uncommitted work is re-read next time.
                    if stop.load(Ordering::Relaxed) && attempt > 20 {
                        tracing::error!("giving up the final flush; records since the last commit will be re-read");
                        return;
                    }
                }
            }
        }
        self.healthy.store(true, Ordering::Relaxed);
        self.last_flush = Instant::now();
        self.evict();
    }

    /// One flush attempt for `partitions`: bulk-writes their dirty profiles, then commits the
    /// partitions whose profiles are all written. Items that failed temporarily stay dirty and
    /// make the attempt fail, so it is retried.
    fn flush(&mut self, consumer: &SpeedConsumer, partitions: &[i32]) -> Result<(), String> {
        let started = Instant::now();
        let now = Utc::now();
        let wanted: HashSet<i32> = partitions.iter().copied().collect();
        let writes: Vec<DocWrite> = self
            .profiles
            .values()
            .filter(|e| e.dirty && wanted.contains(&e.partition))
            .map(|e| DocWrite {
                id: e.profile.id.clone(),
                version: e.profile.watermark.map_or(0, |w| w.offset),
                doc: e.profile.to_document(&self.kinds, now),
            })
            .collect();
        let mut failed_partitions: HashSet<i32> = HashSet::new();
        let mut first_error: Option<String> = None;
        for chunk in writes.chunks(self.policy.bulk_docs.max(1)) {
            let outcomes = match self.runtime.block_on(self.store.bulk_write(chunk)) {
                Ok(o) => o,
                Err(e) => {
                    for w in chunk {
                        if let Some(entry) = self.profiles.get(&w.id) {
                            failed_partitions.insert(entry.partition);
                        }
                    }
                    first_error.get_or_insert_with(|| e.to_string());
                    continue;
                }
            };
            for (w, outcome) in chunk.iter().zip(outcomes) {
                let Some(entry) = self.profiles.get_mut(&w.id) else {
                    continue;
                };
                match outcome {
                    ItemOutcome::Written => {
                        metrics::counter!(m::DOCS_WRITTEN).increment(1);
                        entry.dirty = false;
                        self.dirty -= 1;
                    }
                    ItemOutcome::Retry(reason) => {
                        failed_partitions.insert(entry.partition);
                        first_error.get_or_insert(reason);
                    }
                    ItemOutcome::Stale => {
                        // Someone wrote a newer version: our state is behind. Re-read the
                        // partition from its last commit on top of the stored documents.
                        metrics::counter!(m::DOCS_STALE).increment(1);
                        tracing::warn!(id = %w.id, partition = entry.partition, "stored profile is newer; re-reading partition");
                        self.rewind.insert(entry.partition);
                    }
                    ItemOutcome::Rejected(reason) => {
                        // Counted and logged, never retried forever: one bad document must not
                        // hold back every other profile of its partition.
                        metrics::counter!(m::DOCS_REJECTED).increment(1);
                        tracing::error!(id = %w.id, reason, "elasticsearch rejected profile document");
                        entry.dirty = false;
                        self.dirty -= 1;
                    }
                }
            }
        }
        metrics::histogram!(m::FLUSH_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::counter!(m::FLUSHES).increment(1);
        // Triggers and dead letters of the records we are about to commit must be in Kafka.
        self.producer
            .flush(Duration::from_secs(30))
            .map_err(|e| format!("triggers/dead letters not acknowledged: {e}"))?;
        let commit: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| !failed_partitions.contains(p) && !self.rewind.contains(p))
            .collect();
        self.commit(consumer, &commit);
        tracing::debug!(docs = writes.len(), took = ?started.elapsed(), "flushed");
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    fn commit(&mut self, consumer: &SpeedConsumer, partitions: &[i32]) {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            if let Some(&next) = self.positions.get(p) {
                if self.committed.get(p) != Some(&next) {
                    let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(next));
                }
            }
        }
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
            }
            // Lost the partitions meanwhile: the new owner re-reads; watermarks keep it exact.
            Err(e) => tracing::warn!(error = %e, "commit failed"),
        }
    }

    /// Partitions are being revoked: flush and commit them if possible, then forget them. If
    /// the assignment is already lost, or Elasticsearch will not take the flush, drop their
    /// state uncommitted: the next owner re-reads from the last commit.
    fn give_up(&mut self, consumer: &SpeedConsumer, partitions: &[i32], lost: bool) {
        if !lost {
            let mut attempt = 0;
            while let Err(e) = self.flush(consumer, partitions) {
                if attempt >= 5 {
                    tracing::error!(error = %e, "could not flush revoked partitions; the next owner re-reads them");
                    break;
                }
                std::thread::sleep(self.policy.backoff(attempt));
                attempt += 1;
            }
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

/// The canonical event of a record, or why it is not one.
fn decode(msg: &OwnedMessage) -> Result<Event, String> {
    let payload = msg.payload().ok_or("record has no payload")?;
    let event =
        Event::from_canonical_json(payload).map_err(|e| format!("not a canonical event: {e}"))?;
    let key = msg.key().map(String::from_utf8_lossy);
    let expected = event.partition_key();
    if key.as_deref() != Some(expected.as_str()) {
        // A wrong key puts the user's events on several partitions: their order and the
        // watermark would no longer hold.
        return Err(format!(
            "record key {key:?} is not the event's key {expected:?}"
        ));
    }
    Ok(event)
}
