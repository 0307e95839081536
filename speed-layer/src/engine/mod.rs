//! The speed layer's consumer loop: events in, profiles folded in memory, triggers fired at
//! once, dirty profiles flushed to Elasticsearch on the [`FlushPolicy`], offsets committed only
//! after the flush that covers them.
//!
//! Exactly-once effect: every profile document carries the (partition, offset) of the last
//! event folded into it, and is written with that offset as its external version. After a
//! crash, records are re-read from the last commit and those at or below a document's
//! watermark are skipped.
//!
//! The loop runs on its own thread with a blocking consumer, so the rebalance callback (which
//! runs inside `poll`) can flush synchronously before a partition is given away.
//!
//! - `state`: profiles, positions and the flush/commit/re-read/evict rules, without Kafka;
//!   `cache`: the profiles in memory; `flush`: the background write and its report.
//! - `records`: a batch of records decoded, loaded, folded; triggers fired.
//! - `outbox`: triggers and dead letters to Kafka; `rebalance`: partitions coming and going.
//!
//! [`FlushPolicy`]: crate::config::FlushPolicy

mod cache;
pub use cache::ProfileCache;
mod erasures;
mod flush;
pub(crate) mod identity;
pub(crate) mod outbox;
mod rebalance;
mod records;
pub(crate) mod state;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pulse_service::consumer::{self, Commit, EndOfPartitions, GroupConsumer};
use pulse_service::erasures::ErasureFeed;
use pulse_service::outbox::Outbox;
use pulse_service::{Readiness, Shutdown};
use rdkafka::consumer::Consumer;
use rdkafka::message::OwnedMessage;
use rdkafka::Offset;

use crate::config::SpeedConfig;
use crate::poison::PoisonJournal;
use crate::store::{ProfileStore, StoreError};
use crate::triggers::RuleSet;
use outbox::SpeedOutbox;
use state::{ProfileState, Settings};

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
    /// The triggers/dead-letter producer failed for good (see `pulse_service::outbox`).
    #[error("{0}")]
    Outbox(#[from] pulse_service::outbox::OutboxError),
    #[error("{0}")]
    Erasures(#[from] pulse_service::erasures::FeedError),
}

/// Everything the loop and the rebalance callback share.
pub(crate) struct Engine {
    state: ProfileState<ProfileStore>,
    outbox: SpeedOutbox,
    rules: RuleSet,
    /// How anonymous ids are linked to people.
    identity: crate::identity::IdentityPolicy,
    /// Records that made an earlier run panic, by position, with the panic message: they are
    /// dead-lettered instead of handled (see [`crate::poison`]).
    poison: HashMap<(i32, i64), String>,
    journal: PoisonJournal,
    /// Partitions of the events topic: each record's key must hash to the partition it was
    /// read from (see `pulse_core::partitioner`).
    partitions: i32,
    failpoints: Failpoints,
    /// Erased people, followed while the layer runs (see `erasures.rs`).
    erasures: ErasureFeed,
    /// How far in the erasures' log this replica has acted.
    erased_cursor: usize,
    /// Erased profiles whose documents wait for a moment without a flush in flight.
    to_erase: Vec<String>,
}

/// Test-only fault injection, by message id.
#[derive(Default)]
pub(crate) struct Failpoints {
    /// Panic while folding this message id.
    panic: Option<String>,
    /// The outbox's producer fails for good at this message id.
    fatal_producer: Option<String>,
    /// SIGKILL when one of these message ids is handled.
    kill: std::collections::HashSet<String>,
}

type SpeedConsumer = GroupConsumer<Engine>;

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
    let settings = Settings::of(config)?;
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
    // Triggers and dead letters: offsets are committed only after the outbox saw them
    // acknowledged.
    let outbox = Outbox::new(config.kafka.producer_config(), "speed", stop.clone())?;
    let identity_outbox = Outbox::ordered(config.kafka.producer_config(), "speed", stop.clone())?;
    let rule_count = rules.rules.len();
    let partitions =
        consumer::partition_count(&config.kafka.client_config(), &config.topics.events, &stop)?;
    let erasures = config.erasure_feed()?;
    let erased_cursor = erasures.read().cursor();
    let engine = Arc::new(Mutex::new(Engine {
        state: ProfileState::new(store, runtime, settings, &ready, stop.clone()),
        outbox: SpeedOutbox::new(outbox, &config.topics, &config.es.alias)
            .with_identity(identity_outbox),
        identity: config.identity_policy()?,
        rules,
        poison,
        journal,
        partitions,
        failpoints: Failpoints {
            panic: config.failpoint_panic_message_id.clone(),
            fatal_producer: config.failpoint_fatal_producer_message_id.clone(),
            kill: config.failpoint_kill_message_ids.iter().cloned().collect(),
        },
        erasures,
        erased_cursor,
        to_erase: Vec::new(),
    }));
    let mut consumer_config = config.kafka.consumer_config(&config.group);
    consumer_config.set("max.poll.interval.ms", "600000");
    if config.stop_at_end {
        consumer_config.set("enable.partition.eof", "true");
    }
    let consumer = consumer::join(&consumer_config, &config.topics.events, engine.clone())?;
    tracing::info!(topic = %config.topics.events, group = %config.group, rules = rule_count, "speed layer consuming");

    let mut batch: Vec<OwnedMessage> = Vec::with_capacity(config.max_batch);
    let mut ends = EndOfPartitions::default();
    let started_at = Instant::now();
    let rss_at_start_kb = status_kb("VmRSS:");
    while !stop.is_stopped() {
        // The first poll waits for data; then take what is already there, briefly, so one
        // mget serves many records without holding back a trigger noticeably.
        let (wait, linger) = (Duration::from_millis(100), Duration::from_millis(20));
        consumer::poll_batch(
            &consumer,
            &mut batch,
            config.max_batch,
            wait,
            linger,
            &mut ends,
        );
        let mut engine = consumer::lock(&engine);
        let commit = consumer::committer(&consumer);
        ready.beat();
        if !batch.is_empty() {
            let processing = Instant::now();
            engine.process(&batch);
            tracing::debug!(records = batch.len(), took = ?processing.elapsed(), "batch processed");
        }
        engine.finish_flush(&commit, false);
        engine.apply_erasures();
        engine.apply_rewinds(&consumer);
        if engine.state.flush_due() {
            engine.start_flush(&commit);
        }
        // Back-pressure: with too many unflushed profiles (Elasticsearch slow or down) or too
        // many records Kafka refused (a dead-letter or triggers topic that takes none), stop
        // reading until a flush, which confirms the side outputs first, gets through. Lag
        // grows; memory does not.
        while (engine.state.over_dirty_bound() || engine.outbox.is_full()) && !stop.is_stopped() {
            // Waiting on purpose, not stalled: readiness names what is waited for.
            ready.beat();
            if engine.finish_flush(&commit, true).is_none() {
                if !stop.sleep_blocking(engine.state.retry_in()) {
                    break;
                }
                engine.start_flush(&commit);
            }
        }
        drop(engine);
        if config.stop_at_end && batch.is_empty() && ends.all_read(&consumer) {
            tracing::info!("every assigned partition read to its end");
            break;
        }
    }
    tracing::info!("stopping: final flush and commit");
    // Before the final flush serialises every dirty document: what the profiles held cost.
    let rss_before_final_flush_kb = status_kb("VmRSS:");
    let mut engine = consumer::lock(&engine);
    let partitions = engine.state.positions.read();
    // Eight tries: the waits between them add up to at most 12.7 s (100 ms doubling, jittered
    // down), and each try waits at most CONFIRM_TIMEOUT twice for Kafka and `--es-timeout-secs`
    // for the `_bulk`. With both answering that is within the 30 s an orchestrator gives a
    // stopping pod; with either down the pod may be killed first, and a flush given up or cut
    // short is only re-read by the next run (nothing was committed past it).
    if !engine.flush_now(&consumer::committer(&consumer), &partitions, 8) {
        tracing::error!("giving up the final flush; records since the last commit will be re-read");
    }
    let counts = engine.state.counts;
    let summary = RunSummary {
        elapsed_secs: started_at.elapsed().as_secs_f64(),
        events_folded: counts.folded,
        events_skipped: counts.skipped,
        events_duplicate: counts.duplicates,
        flushes: counts.flushes,
        docs_written: counts.docs_written,
        profiles_in_memory: engine.state.cache.len(),
        peak_rss_kb: status_kb("VmHWM:"),
        rss_at_start_kb,
        rss_before_final_flush_kb,
    };
    let fatal = engine.outbox.fatal_error();
    drop(engine);
    consumer.unsubscribe();
    // Stopped by a producer that failed for good: exit with its error, so the restart (a
    // fresh producer) re-reads and re-sends what this run did not commit.
    if let Some(reason) = fatal {
        return Err(pulse_service::outbox::OutboxError::Fatal(reason).into());
    }
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
    /// Resident memory when consuming started, and right before the final flush: their
    /// difference over `profiles_in_memory` is the memory a profile held costs.
    pub rss_at_start_kb: Option<u64>,
    pub rss_before_final_flush_kb: Option<u64>,
}

/// A kB figure of this process's `/proc/self/status` (Linux): `VmHWM:` (peak resident
/// memory), `VmRSS:` (resident now); for the memory-per-profile figures.
fn status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Engine {
    /// Completes the flush in flight (see [`ProfileState::finish_flush`]), then forgets the
    /// poison records its commit passed.
    fn finish_flush(&mut self, commit: &dyn Commit, wait: bool) -> Option<bool> {
        let fx = self.outbox.effects(commit);
        let finished = self.state.finish_flush(&fx, wait);
        self.forget_committed_poison();
        finished
    }

    fn start_flush(&mut self, commit: &dyn Commit) {
        let fx = self.outbox.effects(commit);
        self.state.start_flush_all(&fx);
    }

    fn flush_now(&mut self, commit: &dyn Commit, partitions: &[i32], attempts: usize) -> bool {
        let fx = self.outbox.effects(commit);
        let done = self.state.flush_now(&fx, partitions, attempts);
        self.forget_committed_poison();
        done
    }

    /// Seeks each partition whose stored profile was newer back to where its re-read starts.
    fn apply_rewinds(&mut self, consumer: &SpeedConsumer) {
        for (p, at) in self.state.take_rewinds() {
            let Some(offset) = at else {
                continue;
            };
            let topic = &self.outbox.events_topic;
            if let Err(e) = consumer.seek(topic, p, Offset::Offset(offset), Duration::from_secs(10))
            {
                tracing::error!(partition = p, offset, error = %e, "seek for re-read failed; trying again");
                self.state.rewind_later(p);
            }
        }
    }

    /// Drops journaled poison records whose offset is committed: they were dead-lettered and
    /// will not be read again.
    fn forget_committed_poison(&mut self) {
        if self.poison.is_empty() {
            return;
        }
        let positions = &self.state.positions;
        let done: Vec<(i32, i64)> = self
            .poison
            .keys()
            .filter(|(p, o)| positions.committed(*p).is_some_and(|c| *o < c))
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
}
