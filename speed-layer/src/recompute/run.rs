//! Building the new index: the archive's rows of each partition in offset order, then Kafka
//! from where the archive ends, up to the live layer's commit, folded by the live layer's own
//! state ([`ProfileState`]: the same fold, models, dedupe, watermarks, external versions,
//! flush and commit rules).
//!
//! Progress is this recompute's consumer group (`recompute-<index>`), committed only after the
//! flush that covers it, exactly as the live layer commits: after a SIGKILL the next run
//! resumes from the commit, and the documents' watermarks skip what was folded past it.
//!
//! The speed layer's identity records are read with the events (from the archive's
//! `identities/` files and from Kafka) and handled by the live layer's own rules
//! (`engine::identity`): a device turns into a pointer where the live layer's did, a person
//! takes the merge and the forwarded events the live layer's took, so people come out merged
//! as they are live.
//!
//! Nothing is sent beside the profiles: no trigger (the live layer fired each for the events
//! it committed, and the recompute never folds past that commit), no identity record (those
//! the live layer wrote are what is read) and no dead letter of a record (the live layer sent
//! those). A document the new index refuses for good goes to the profiles dead-letter topic,
//! named with the new index.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pulse_core::identity::TopicRecord;
use pulse_core::partitioner::Placement;
use pulse_service::consumer::topic_committer;
use pulse_service::outbox::Outbox;
use pulse_service::{Readiness, Shutdown};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::plan::{self, PartitionPlan, Plan};
use super::progress::Progress;
use super::read_ahead::ReadAhead;
use super::{indices, RecomputeArgs, RecomputeError};
use crate::engine::identity::{Read, Replay, Unifier};
use crate::engine::outbox::SpeedOutbox;
use crate::engine::state::{Effects, ProfileState, Settings};
use crate::store::ProfileStore;

/// Events folded per load-and-fold step: one mget for the profiles not in memory.
const CHUNK: usize = 2_000;

/// A record to fold: partition, offset, and its event or identity record (`None`: the live
/// layer dead-lettered it; it only moves the position, in order with the others).
type Record = (i32, i64, Option<TopicRecord>);

/// What a run did, printed as JSON on exit.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunSummary {
    pub index: String,
    pub from_archive: u64,
    pub from_kafka: u64,
    pub folded: u64,
    /// At or below a stored watermark (a resumed run meets these once).
    pub skipped: u64,
    pub duplicates: u64,
    /// Records the live layer dead-lettered; skipped here.
    pub unusable: u64,
    /// Identity records (links, merges, refusals, forwarded events of merged devices) read
    /// from the archive and Kafka, among the two counts above.
    pub identity_records: u64,
    pub files: u64,
    pub elapsed_secs: f64,
    pub events_per_sec: f64,
    /// Where the time went.
    pub seconds: Timings,
}

/// Seconds spent per step of a run (what a slow recompute is asked first).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Timings {
    /// Waiting for the archive's Parquet files (fetched and decoded one unit ahead, beside
    /// the fold: this is the time the fold was held back by them).
    pub archive_read: f64,
    /// Waiting for Kafka's records.
    pub kafka_read: f64,
    /// Loading stored profiles (mget) before their events are folded.
    pub load: f64,
    /// Folding events into profiles (models, dedupe), in memory.
    pub fold: f64,
    /// Serialising documents and waiting for flushes (the bulk writes run beside the fold;
    /// this is the time the fold was held back by them), the final flush included.
    pub flush: f64,
    /// Held back by `--max-events-per-sec`.
    pub throttle: f64,
}

/// Whether a run may build its index from nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `recompute run`: create the index when missing, resume it when not.
    CreateOrResume,
    /// A promote's or a rollback's catch-up: the index must exist (a missing one would be
    /// rebuilt from scratch while the live layer is stopped for it).
    Existing,
}

/// Builds (or resumes) `args.index` up to the live layer's commit, then flushes and commits.
pub fn run(args: &RecomputeArgs, stop: Shutdown) -> Result<RunSummary, RecomputeError> {
    run_on(args, stop, Target::CreateOrResume)
}

/// [`run`], on an index that must exist or not as `target` says.
pub fn run_on(
    args: &RecomputeArgs,
    stop: Shutdown,
    target: Target,
) -> Result<RunSummary, RecomputeError> {
    super::lease::with_lease(args, &args.index, "run", &stop, || {
        run_leased(args, stop.clone(), target)
    })
}

/// [`run_on`], by a process that holds the index's lease (see [`super::lease`]): no other run
/// folds into it and no cleanup deletes it meanwhile.
pub(super) fn run_leased(
    args: &RecomputeArgs,
    stop: Shutdown,
    target: Target,
) -> Result<RunSummary, RecomputeError> {
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
    );
    let live = ProfileStore::new(&args.speed.es)?;
    check_target(args, &live, &runtime)?;
    let fresh = !runtime.block_on(indices::exists(&live, &args.index))?;
    if fresh && target == Target::Existing {
        return Err(RecomputeError::Refused(format!(
            "index {} does not exist (deleted by a cleanup?): build it with `recompute run` \
             first, with the live layer running",
            args.index
        )));
    }
    let archive = plan::open_archive(args)?;
    let mut plan = runtime.block_on(plan::make(args, archive.as_deref(), fresh))?;
    if let Some(scope) = &args.scope {
        plan.partitions
            .retain(|p| scope.partitions.contains(&p.partition));
    }
    plan.check()?;
    if fresh {
        // Commits left by an index of this name deleted since would be taken as progress by
        // the next run after a kill: they are replaced by where this one starts, before the
        // index exists. So an index that exists always has its own commits, also when this
        // run stops at any point from here on (a run that finds no index starts afresh).
        let starts: Vec<(i32, i64)> = plan
            .partitions
            .iter()
            .map(|p| (p.partition, p.resume))
            .collect();
        super::kafka::commit(
            &args.speed.kafka,
            &args.group(),
            &args.speed.topics.events,
            &starts,
        )?;
        if !runtime.block_on(indices::create_index(&live, &args.index))? {
            return Err(RecomputeError::Refused(format!(
                "index {} was created by someone else meanwhile (by hand, or by a process \
                 that does not take its lease): run again to resume it",
                args.index
            )));
        }
        tracing::info!(index = %args.index, "created the index");
    }
    let target = live.on_index(&args.index);
    // A panic while folding journals its record here (see `recompute::record_panic`).
    let journal = args.poison_journal();
    if fresh {
        // Entries left by a deleted index of this name are not this one's.
        if let Err(e) = journal.forget_all() {
            tracing::warn!(error = %e, journal = %journal.path().display(), "clearing the poison journal failed");
        }
    }
    super::set_journal(journal.clone());
    // Off while it loads; an error that ends the run leaves it off until the next run (which
    // a promote always is) turns it back on.
    runtime.block_on(indices::set_refresh_interval(&live, &args.index, "-1"))?;
    tracing::info!(index = %args.index, offsets = plan.offsets(), "recompute starting");

    let mut consumer_config = args.speed.kafka.consumer_config(&args.group());
    consumer_config.set("enable.partition.eof", "true");
    let consumer: BaseConsumer = consumer_config.create()?;
    let topic = args.speed.topics.events.clone();
    let partition_count =
        pulse_service::consumer::partition_count(&args.speed.kafka.client_config(), &topic, &stop)?;
    let commit = topic_committer(&consumer, &topic);
    let outbox = Outbox::new(
        args.speed.kafka.producer_config(),
        "recompute",
        stop.clone(),
    )?;
    let outbox = SpeedOutbox::new(outbox, &args.speed.topics, &args.index);
    let settings = Settings::of(&args.speed)?;
    let ready = Readiness::new("recompute");
    let mut folder = Folder {
        state: ProfileState::new(target, runtime.clone(), settings, &ready, stop.clone()),
        progress: Progress::new(&plan, args.max_events_per_sec),
        summary: RunSummary {
            index: args.index.clone(),
            ..RunSummary::default()
        },
        stop: stop.clone(),
        kill_at: args.failpoint_kill_at,
        partition_count,
        poison: journal.load(),
        panic_at: args.speed.failpoint_panic_message_id.clone(),
        identity: args.speed.identity_policy()?,
        scope: args.scope.as_ref().map(|s| s.ids.clone()),
        erasures: args
            .speed
            .erasure_feed()
            .map_err(crate::engine::EngineError::from)?,
    };
    if !folder.poison.is_empty() {
        tracing::warn!(
            records = folder.poison.len(),
            "records that made an earlier run panic are passed over"
        );
    }
    if fresh {
        folder.state.assume_store_empty();
    }
    let partitions: Vec<i32> = plan.partitions.iter().map(|p| p.partition).collect();
    folder.state.positions.assign(&partitions);
    let fx = outbox.effects(&commit);
    if let Some(store) = &archive {
        let units = plan.partitions.iter().flat_map(|p| p.units.clone());
        let reader = ReadAhead::spawn(runtime.clone(), store.clone(), units.collect())?;
        for p in &plan.partitions {
            folder.archive(&fx, &reader, p)?;
        }
    }
    folder.kafka(&fx, &consumer, &topic, &plan)?;
    folder.progress.finish();
    if stop.is_stopped() {
        tracing::warn!("stopped; flushing what was folded (the next run resumes from it)");
    }
    let clock = Instant::now();
    let flushed = folder.state.flush_now(&fx, &partitions, 8);
    folder.summary.seconds.flush += clock.elapsed().as_secs_f64();
    // Searchable again (verify, promote), whether or not the run reached its end.
    runtime.block_on(indices::set_refresh_interval(
        &live,
        &args.index,
        crate::store::REFRESH_INTERVAL,
    ))?;
    folder.check_no_other_writer()?;
    if !flushed {
        return Err(RecomputeError::Refused(
            "the final flush did not get through; run again: it resumes from the last commit"
                .into(),
        ));
    }
    if stop.is_stopped() {
        // Not at the live layer's commit: a promote must not move the alias to this index.
        return Err(RecomputeError::Refused(
            "stopped before reaching the live layer's commit; what was folded is flushed and \
             committed, run again to resume"
                .into(),
        ));
    }
    let mut summary = folder.summary;
    let counts = folder.state.counts;
    (summary.folded, summary.skipped, summary.duplicates) =
        (counts.folded, counts.skipped, counts.duplicates);
    summary.elapsed_secs = folder.progress.started.elapsed().as_secs_f64();
    summary.events_per_sec =
        (summary.from_archive + summary.from_kafka) as f64 / summary.elapsed_secs.max(1e-9);
    Ok(summary)
}

/// Refuses an index to build that is the one the alias points to, or one the template does
/// not cover (`<alias>-…`: the index gets the template's settings and this binary's mapping).
fn check_target(
    args: &RecomputeArgs,
    live: &ProfileStore,
    runtime: &tokio::runtime::Runtime,
) -> Result<(), RecomputeError> {
    let alias = &args.speed.es.alias;
    if !args.index.starts_with(&format!("{alias}-")) {
        return Err(RecomputeError::Refused(format!(
            "index {} is not covered by the profiles template ({alias}-*): name it {alias}-v2, say",
            args.index
        )));
    }
    let current = runtime.block_on(indices::alias_target(live, alias))?;
    if current.as_deref() == Some(args.index.as_str()) {
        return Err(RecomputeError::Refused(format!(
            "index {} is what alias {alias} points to: a recompute never writes the live index",
            args.index
        )));
    }
    Ok(())
}

/// The live layer's state, fed from the archive and Kafka instead of a group's assignment.
struct Folder {
    state: ProfileState<ProfileStore>,
    progress: Progress,
    summary: RunSummary,
    stop: Shutdown,
    /// See [`RecomputeArgs::failpoint_kill_at`].
    kill_at: Option<(i32, i64)>,
    /// Partitions of the events topic: a record the live layer dead-lettered for its
    /// partition is passed over here too (see `pulse_core::partitioner`).
    partition_count: i32,
    /// Records that made an earlier run of this index panic (see [`crate::poison`]): passed
    /// over, counted as `unusable` and logged. With the live layer's models the live layer
    /// panicked on them too and dead-lettered them; a record only the recompute's models
    /// panic on is left out of the new index, and `verify` shows its profile.
    poison: std::collections::HashMap<(i32, i64), String>,
    /// Tests only: panic while folding the event with this message id, as a model bug would.
    panic_at: Option<String>,
    /// The live layer's identity settings: the same links are refused.
    identity: crate::identity::IdentityPolicy,
    /// The only profiles folded, when the run has a [`super::Scope`].
    scope: Option<std::collections::HashSet<String>>,
    /// Erased people, followed during the run: their records are passed over (a person
    /// erased while the run goes has profiles in it from before; promote deletes them).
    erasures: pulse_service::erasures::ErasureFeed,
}

impl Folder {
    /// A document of the index newer than what this run wrote (409): another process writes
    /// into the index (a live layer pointed at it, a hand-made writer; two runs cannot, they
    /// share a lease). The live layer re-reads such a partition; a recompute cannot know
    /// what the other writer folded, and a partition left uncommitted must not end in a run
    /// that looks complete, so the run fails with the partitions named.
    fn check_no_other_writer(&self) -> Result<(), RecomputeError> {
        let stale = self.state.stale_partitions();
        if stale.is_empty() {
            return Ok(());
        }
        Err(RecomputeError::Refused(format!(
            "index {} holds documents newer than this run wrote on partitions {stale:?}: \
             another process writes into it (a live speed layer whose alias points to it?); \
             those partitions are not committed. Stop that writer, then run again",
            self.summary.index
        )))
    }

    /// Folds the partition's archive units, each in offset order, from where the recompute
    /// stands up to the live layer's commit.
    fn archive(
        &mut self,
        fx: &dyn Effects,
        reader: &ReadAhead,
        plan: &PartitionPlan,
    ) -> Result<(), RecomputeError> {
        for unit in &plan.units {
            if self.stop.is_stopped() {
                return Ok(());
            }
            let mut records: Vec<Record> = Vec::new();
            let clock = Instant::now();
            let rows = reader.next_unit().ok_or_else(|| {
                RecomputeError::Archive("the archive reader ended before the plan's units".into())
            })??;
            self.summary.seconds.archive_read += clock.elapsed().as_secs_f64();
            let wanted = |offset: i64| offset >= plan.resume && offset < plan.bound;
            for file in rows.events {
                self.progress.file_read(file.len());
                self.summary.files += 1;
                let events = file.into_iter().filter(|r| wanted(r.offset));
                records.extend(
                    events.map(|r| (r.partition, r.offset, Some(TopicRecord::Event(r.event)))),
                );
            }
            for file in rows.identities {
                self.progress.file_read(file.len());
                self.summary.files += 1;
                let identities = file.into_iter().filter(|r| wanted(r.offset));
                let before = records.len();
                records.extend(
                    identities
                        .map(|r| (r.partition, r.offset, Some(TopicRecord::Identity(r.record)))),
                );
                self.summary.identity_records += (records.len() - before) as u64;
            }
            // One partition's records in its order: a link between the events around it.
            records.sort_by_key(|(_, offset, _)| *offset);
            self.summary.from_archive += records.len() as u64;
            let size = self.progress.chunk(CHUNK);
            let mut records = records.into_iter();
            loop {
                let chunk: Vec<Record> = records.by_ref().take(size).collect();
                if chunk.is_empty() {
                    break;
                }
                if !self.fold(fx, chunk) {
                    return self.check_no_other_writer();
                }
            }
            // The unit's dead-lettered records hold offsets too: the position is past them.
            let last = unit.range.last.min(plan.bound - 1);
            if last >= plan.resume {
                self.state.positions.handled(plan.partition, last);
            }
        }
        Ok(())
    }

    /// Reads every partition from where the archive ended to the live layer's commit.
    fn kafka(
        &mut self,
        fx: &dyn Effects,
        consumer: &BaseConsumer,
        topic: &str,
        plan: &Plan,
    ) -> Result<(), RecomputeError> {
        let mut open: std::collections::BTreeMap<i32, i64> = plan
            .partitions
            .iter()
            .filter(|p| p.kafka_offsets() > 0)
            .map(|p| (p.partition, p.bound))
            .collect();
        if open.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for p in plan
            .partitions
            .iter()
            .filter(|p| open.contains_key(&p.partition))
        {
            tpl.add_partition_offset(topic, p.partition, Offset::Offset(p.kafka_from))?;
        }
        consumer.assign(&tpl)?;
        let size = self.progress.chunk(CHUNK);
        let mut chunk: Vec<Record> = Vec::with_capacity(size);
        // Each partition's first record must be where the plan starts it: Kafka resets a
        // fetch whose offset retention dropped since, which would skip history silently.
        let mut expected: std::collections::BTreeMap<i32, i64> = plan
            .partitions
            .iter()
            .filter(|p| open.contains_key(&p.partition))
            .map(|p| (p.partition, p.kafka_from))
            .collect();
        while !open.is_empty() && !self.stop.is_stopped() {
            let clock = Instant::now();
            let polled = consumer.poll(Duration::from_millis(100));
            self.summary.seconds.kafka_read += clock.elapsed().as_secs_f64();
            let msg = match polled {
                Some(Ok(m)) => Some(m.detach()),
                // Nothing more to read (the bound is below the partition's end when the plan
                // was made, so this only ends a partition whose last offsets hold no record).
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    self.close(consumer, topic, &mut open, p)?;
                    None
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    None
                }
                None => None,
            };
            // A poll that found nothing folds what is gathered rather than wait for more.
            let idle = msg.is_none();
            if let Some(msg) = msg {
                let (p, offset) = (msg.partition(), msg.offset());
                if let Some(want) = expected.remove(&p) {
                    if offset != want {
                        return Err(RecomputeError::Refused(format!(
                            "partition {p}: Kafka gave offset {offset} where {want} was \
                             expected (retention dropped it since the plan); nothing after \
                             the last commit is taken: plan again"
                        )));
                    }
                }
                match open.get(&p) {
                    Some(bound) if offset < *bound => {
                        self.summary.from_kafka += 1;
                        let at = Placement {
                            partition: p,
                            partitions: self.partition_count,
                        };
                        // The live layer's decoder: what it dead-lettered is passed over.
                        let record =
                            TopicRecord::decode(msg.headers(), msg.key(), msg.payload(), at).ok();
                        match &record {
                            None => self.summary.unusable += 1,
                            Some(TopicRecord::Identity(_)) => self.summary.identity_records += 1,
                            Some(TopicRecord::Event(_)) => {}
                        }
                        chunk.push((p, offset, record));
                        self.progress.kafka_at(p, offset);
                        if offset + 1 >= *bound {
                            self.close(consumer, topic, &mut open, p)?;
                        }
                    }
                    Some(_) => self.close(consumer, topic, &mut open, p)?,
                    None => {}
                }
            }
            let full = chunk.len() >= size || (idle && !chunk.is_empty());
            if full && !self.fold(fx, std::mem::take(&mut chunk)) {
                return self.check_no_other_writer();
            }
        }
        if !chunk.is_empty() {
            self.fold(fx, chunk);
        }
        Ok(())
    }

    /// A partition read to its bound is paused: its later records are the live layer's.
    fn close(
        &mut self,
        consumer: &BaseConsumer,
        topic: &str,
        open: &mut std::collections::BTreeMap<i32, i64>,
        p: i32,
    ) -> Result<(), RecomputeError> {
        open.remove(&p);
        self.progress.kafka_done(p);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, p);
        consumer.pause(&tpl)?;
        Ok(())
    }

    /// Loads the chunk's profiles not in memory (one mget), handles each record in order as
    /// the live layer does (a position without a record is only passed), then lets the state
    /// flush and commit as the live layer does. `false` when stopped.
    fn fold(&mut self, fx: &dyn Effects, chunk: Vec<Record>) -> bool {
        let clock = Instant::now();
        let count = chunk.len() as u64;
        let scope = self.scope.as_ref();
        let ids: Vec<Option<String>> = chunk
            .iter()
            .map(|(_, _, r)| r.as_ref().map(TopicRecord::key))
            .map(|id| id.filter(|id| scope.is_none_or(|s| s.contains(id))))
            .collect();
        let loaded = self
            .state
            .load_absent(ids.iter().flatten().map(String::as_str));
        let folding = Instant::now();
        self.summary.seconds.load += (folding - clock).as_secs_f64();
        if !loaded {
            return false;
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let feed = self.erasures.clone();
        let erasures = feed.read();
        for ((p, offset, record), id) in chunk.into_iter().zip(ids) {
            if self.kill_at == Some((p, offset)) {
                crate::poison::kill_self(&format!("partition {p} offset {offset}"));
            }
            if let Some(reason) = self.poison.get(&(p, offset)) {
                tracing::warn!(
                    partition = p,
                    offset,
                    reason,
                    "passing over a record that made an earlier run panic"
                );
                self.summary.unusable += 1;
            } else if let (Some(record), Some(id)) = (record, id) {
                // A record the live layer refused went to its dead-letter topic then.
                crate::poison::working_on(p, offset);
                let read = Read {
                    partition: p,
                    offset,
                    clock,
                    now_ms,
                };
                let mut unifier = Unifier {
                    state: &mut self.state,
                    policy: &self.identity,
                    erasures: &erasures,
                    writes: Replay,
                };
                let _ = match record {
                    TopicRecord::Event(event) => {
                        if self.panic_at.as_deref() == Some(event.message_id.as_str()) {
                            panic!("failpoint: folding message_id {}", event.message_id);
                        }
                        unifier.event(event, id, read)
                    }
                    TopicRecord::Identity(record) => unifier.record(record, id, read),
                };
                crate::poison::idle();
            }
            self.state.positions.handled(p, offset);
        }
        let flushing = Instant::now();
        self.summary.seconds.fold += (flushing - folding).as_secs_f64();
        self.state.finish_flush(fx, false);
        if !self.state.stale_partitions().is_empty() {
            // Not re-read as the live layer would: the run ends, naming the writer.
            return false;
        }
        if self.state.flush_due() || self.state.eager_flush_due() {
            self.state.start_flush_all(fx);
        }
        while self.state.over_dirty_bound() && !self.stop.is_stopped() {
            if self.state.finish_flush(fx, true).is_none() {
                if !self.stop.sleep_blocking(self.state.retry_in()) {
                    break;
                }
                self.state.start_flush_all(fx);
            }
        }
        let throttled = Instant::now();
        self.summary.seconds.flush += (throttled - flushing).as_secs_f64();
        self.progress.advance(count, &self.stop);
        self.summary.seconds.throttle += throttled.elapsed().as_secs_f64();
        !self.stop.is_stopped()
    }
}
