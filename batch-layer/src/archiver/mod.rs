//! The archiver: every event of `events` as Parquet in object storage, exactly once.
//!
//! Records of a partition are buffered as one unit (an offset range). When the unit rolls (by
//! size or age), its events are written as one Parquet file per event date, named after the
//! range, then the unit's progress marker, then the Kafka offset is committed (for lag
//! monitoring only). On start, and whenever a partition is assigned, its progress is read from
//! its markers: records at or below it are skipped, and files beyond it (left by a crash between
//! files and marker, found from the unit's pending note) are deleted before the range is
//! written again. So after a SIGKILL at any point there are no duplicate rows and no gaps, and
//! starting a partition reads a handful of objects however old the archive is. See
//! [`crate::layout`] and [`pulse_archive::progress`].
//!
//! A rolled unit's files are built by a pool of one thread per core ([`build`]) while
//! records are read on; the consuming thread writes them and the marker once the build is
//! done, and always before the partition's next unit, at a revocation and at a stop.

mod build;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::basic::Compression;
use pulse_core::kafka::{KafkaArgs, TopicArgs};
use pulse_core::partitioner::Placement;
use pulse_service::consumer::{self, Commit, EndOfPartitions, PartitionOwner, Positions};
use pulse_service::erasures::ErasureFeed;
use pulse_service::outbox::{Outbox, OutboxError, Source};
use pulse_service::{Condition, Readiness, RetryPolicy, Shutdown};
use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::Offset;
use tokio::runtime::Runtime;

use build::{BuildPool, Building};

use crate::identity_file::ArchivedIdentity;
use crate::layout::FileRange;
use crate::parquet_file::{Codec, RowsBuilder, RowsSize, DEFAULT_ZSTD_LEVEL};
use crate::store::{open_store, StoreArgs};
use pulse_archive::progress::{self, Coverage};
use pulse_core::identity::TopicRecord;

#[derive(Debug, Clone, clap::Args)]
pub struct ArchiverConfig {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topics: TopicArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long, env = "PULSE_ARCHIVER_GROUP", default_value = "archiver")]
    pub group: String,
    /// Roll a partition's unit when its events reach this many bytes of JSON.
    #[arg(long, env = "PULSE_ROLL_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub roll_bytes: usize,
    /// Roll a partition's unit when it is this old, seconds.
    #[arg(long, env = "PULSE_ROLL_SECS", default_value_t = 300.0)]
    pub roll_secs: f64,
    /// Most bytes buffered over all partitions; beyond it the largest unit rolls early.
    #[arg(long, env = "PULSE_MAX_BUFFER_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub max_buffer_bytes: usize,
    #[arg(long, env = "PULSE_PARQUET_CODEC", value_enum, default_value_t = Codec::Zstd)]
    pub codec: Codec,
    /// zstd's level for `--codec zstd`: 1 is the fastest, higher levels trade CPU for smaller
    /// files (each level up is slower for a few per cent less).
    #[arg(long, env = "PULSE_PARQUET_ZSTD_LEVEL", default_value_t = DEFAULT_ZSTD_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=22))]
    pub zstd_level: i32,
    /// Stop (after rolling everything) once every assigned partition is read to its end.
    #[arg(long, env = "PULSE_STOP_AT_END")]
    pub stop_at_end: bool,
    /// Longest the archiver blocks between two polls, retrying the object store and waiting for
    /// dead letters, over all the units it rolls and the partitions it starts in that turn;
    /// then it gives the rest of that work up for now, goes back to polling and reads those
    /// ranges again. Keep it below the consumer's `max.poll.interval.ms` (300 s by default): a
    /// member that does not poll for longer loses its partitions while it may still write
    /// their files.
    #[arg(long, env = "PULSE_ARCHIVER_MAX_BLOCK_SECS", default_value_t = 120.0)]
    pub max_block_secs: f64,
    /// Address of /healthz, /readyz (503 while the object store fails) and /metrics.
    #[arg(long, env = "PULSE_ARCHIVER_METRICS_LISTEN", default_value = "0.0.0.0:9103")]
    pub metrics_listen: std::net::SocketAddr,
}

/// Metric names of the archiver.
pub mod metric {
    pub const ROWS: &str = "pulse_archiver_rows_total";
    pub const FILES: &str = "pulse_archiver_files_total";
    pub const PARQUET_BYTES: &str = "pulse_archiver_parquet_bytes_total";
    pub const JSON_BYTES: &str = "pulse_archiver_json_bytes_total";
    pub const UNITS: &str = "pulse_archiver_units_total";
    pub const DEAD_LETTERED: &str = "pulse_archiver_dead_lettered_total";
    /// Identity records of the speed layer archived (beside the events, under `identities/`).
    pub const IDENTITY_RECORDS: &str = "pulse_archiver_identity_records_total";
    pub const STORE_FAILURES: &str = "pulse_archiver_store_failures_total";
    /// Events and identity records of erased people left out of the archive.
    pub const ERASED: &str = "pulse_archiver_erased_total";
    pub const BUFFERED_BYTES: &str = "pulse_archiver_buffered_bytes";
    /// Objects listed or read to start partitions (their markers and pending notes): flat
    /// however old the archive is, except once per partition archived in the old format.
    pub const PROGRESS_OBJECTS_READ: &str = "pulse_archiver_progress_objects_read_total";
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiverError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("object store: {0}")]
    Store(String),
    /// The dead-letter producer failed for good (see `pulse_service::outbox`).
    #[error("{0}")]
    Outbox(#[from] pulse_service::outbox::OutboxError),
    #[error("runtime: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Erasures(#[from] pulse_service::erasures::FeedError),
    /// A unit that cannot be archived. The process stops before any marker is written past
    /// the unit's range, so the restart reads the range again: nothing is skipped.
    #[error("partition {partition}, offsets {first}..={last}: building the Parquet file failed: {message}")]
    Parquet {
        partition: i32,
        first: i64,
        last: i64,
        message: String,
    },
}

/// Why a unit was not archived (it stays unmarked, so it is archived again later).
enum RollFailure {
    /// The process is stopping during an outage; the restart re-reads the range.
    Stopped,
    /// The object store did not answer within `--max-block-secs`, or the group took the
    /// partition away meanwhile: the range is read again from `first`, after a poll.
    GaveUp {
        first: i64,
    },
    Fatal(ArchiverError),
}

/// Why an object-store call (or a wait for Kafka) was given up.
#[derive(Debug)]
enum Interrupted {
    /// The process is stopping.
    Stopped,
    /// `--max-block-secs` passed.
    OutOfTime,
}

/// Object-store calls are retried until they work (the archive may lag, it must not skip)
/// or the process stops.
const STORE_RETRY: RetryPolicy =
    RetryPolicy::forever(Duration::from_millis(100), Duration::from_secs(6));

/// Rows a unit's file has room for when it is started (it grows beyond).
const ROWS_PER_FILE_HINT: usize = 1_024;

/// Partitions whose progress is read at the same time when an assignment starts them.
const PARTITIONS_STARTED_AT_ONCE: usize = 16;

/// Records read in one batch: one lock of the state per batch, not per record.
const ARCHIVER_BATCH: usize = 1_000;

/// A started partition: how far the archive got, its highest marker, and the objects that
/// the next marker makes obsolete (the marker before the highest, old-format markers, notes
/// of committed units). The highest marker becomes obsolete one marker later: readers
/// listing meanwhile find one of the two (see `pulse_archive::progress`).
struct Started {
    coverage: Coverage,
    newest: Option<Path>,
    obsolete: Vec<Path>,
}

impl Started {
    fn last(&self) -> Option<i64> {
        self.coverage.last()
    }
}

/// One partition's open unit.
struct Unit {
    first: i64,
    last: i64,
    /// The unit's events by event date, as the columns of their file, in offset order.
    events: BTreeMap<NaiveDate, RowsBuilder>,
    /// The speed layer's identity records of the range, in offset order (archived apart).
    identities: Vec<ArchivedIdentity>,
    bytes: usize,
    opened: Instant,
}

struct State {
    dlq_topic: String,
    store: Arc<dyn ObjectStore>,
    runtime: Arc<Runtime>,
    /// Dead letters, acknowledged before the marker of their range is written.
    outbox: Outbox,
    /// How the unit's files are compressed (`--codec`, `--zstd-level`).
    compression: Compression,
    /// The threads building rolled units' files.
    builders: BuildPool,
    /// Beaten every turn of the loop (served as /readyz).
    ready: Readiness,
    /// False while object-store operations fail.
    store_health: Condition,
    /// False while Kafka has not acknowledged the dead letters of a unit being rolled.
    dead_letters: Condition,
    shutdown: Shutdown,
    /// A unit that could not be archived while rolling outside the loop (at a revocation):
    /// the loop stops with it.
    failure: Option<ArchiverError>,
    /// Partition → how far the archive got (from its markers); absent: not initialised yet.
    progress: HashMap<i32, Started>,
    units: HashMap<i32, Unit>,
    /// Rolled units whose files are being built, one per partition at most: written (files,
    /// then marker) before anything else of their partition. Their bytes count in
    /// `buffered` until then, so `--max-buffer-bytes` bounds them too.
    building: HashMap<i32, Building>,
    /// How large each partition's last unit's columns grew: the next one starts with room
    /// for as much (see `RowsSize`).
    sizes: HashMap<i32, RowsSize>,
    buffered: usize,
    /// Partitions whose roll or initialisation was given up at a stop, or whose unit could
    /// not be built: nothing more of them is buffered or written in this run (a later marker
    /// would pass the dropped range).
    abandoned: HashSet<i32>,
    /// Partitions whose work was given up for now, and the offset their re-read starts at:
    /// their records are dropped until the loop has sought back there.
    rewinds: HashMap<i32, i64>,
    /// Offsets per partition whose record this run has handed to the outbox as a dead letter
    /// and whose range no marker covers yet: a range read again after its unit was given up
    /// (its dead letters still queued, or kept to be sent again) does not dead-letter them a
    /// second time, so an outage that gives a unit up every `--max-block-secs` neither fills
    /// the dead-letter topic with copies nor grows the outbox.
    dead_lettered: HashMap<i32, BTreeSet<i64>>,
    /// Partitions of the events topic: each record's key must hash to the partition it was
    /// read from (see `pulse_core::partitioner`).
    partitions: i32,
    /// Erased people (`pulse_core::erasure`), followed while the archiver runs: their records
    /// are not buffered, and a unit is filtered again as it is written, so one buffered
    /// before an erasure reaches no file.
    erasures: ErasureFeed,
    /// See `--max-block-secs`.
    max_block: Duration,
    /// When the blocking budget of this turn (`max_block` from its start) runs out: shared by
    /// every roll and partition start of the turn, so that many units in a row cannot keep
    /// the member from polling for more than one budget.
    turn_deadline: Instant,
    /// The owned partitions and their commits (for lag monitoring only: the markers are
    /// the truth).
    positions: Positions,
    pub rows: u64,
    pub files: u64,
    pub parquet_bytes: u64,
    pub json_bytes: u64,
}

impl PartitionOwner for State {
    fn assigned(&mut self, partitions: &[i32]) {
        self.positions.assign(partitions);
    }

    fn revoking(&mut self, commit: &dyn Commit, partitions: &[i32], lost: bool) {
        // Called inside a poll: a budget of its own, not what is left of the last turn's.
        self.start_turn();
        // Roll what we have so the next owner starts after it (every unit's build queued
        // first, so that the pool builds them side by side, then each written); if this
        // fails the next owner re-reads the range (files beyond the marker are cleaned up).
        if !lost {
            for roll in [State::roll, State::settle] {
                for &p in partitions {
                    if let Err(RollFailure::Fatal(e)) = roll(self, commit, p) {
                        self.failure.get_or_insert(e);
                    }
                }
            }
        }
        for &p in partitions {
            if let Some(unit) = self.units.remove(&p) {
                self.buffered -= unit.bytes;
            }
            // Lost, or not written: the next owner archives the range (a build still running
            // ends unused).
            self.take_building(p);
            self.progress.remove(&p);
            self.sizes.remove(&p);
            // The next owner reads the range again and dead-letters what it finds there.
            self.dead_lettered.remove(&p);
            self.rewinds.remove(&p);
        }
        self.positions.revoke(partitions);
    }
}

/// What a run wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ArchiveSummary {
    pub elapsed_secs: f64,
    pub rows: u64,
    pub files: u64,
    pub parquet_bytes: u64,
    pub json_bytes: u64,
}

/// Archives until `stop` (or, with `--stop-at-end`, until everything is read). `ready` turns
/// unhealthy while the object store fails (set again by the next success), and the loop beats
/// it on every turn.
pub fn run(
    config: &ArchiverConfig,
    stop: Shutdown,
    ready: Readiness,
) -> Result<ArchiveSummary, ArchiverError> {
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
    );
    let store = open_store(&config.store).map_err(|e| ArchiverError::Store(e.to_string()))?;
    let partitions =
        consumer::partition_count(&config.kafka.client_config(), &config.topics.events, &stop)?;
    let erasures = ErasureFeed::follow_loaded(
        config.kafka.consumer_config("pulse-archiver-erasures"),
        &config.topics.erasures,
    )?;
    let state = Arc::new(Mutex::new(State {
        dlq_topic: config.topics.dlq.clone(),
        store,
        runtime,
        outbox: Outbox::new(config.kafka.producer_config(), "archiver", stop.clone())?,
        store_health: ready.condition("object store unavailable"),
        dead_letters: ready
            .condition("dead letters not acknowledged by Kafka; no marker is written"),
        compression: config.codec.compression(config.zstd_level),
        builders: BuildPool::per_core()?,
        ready,
        shutdown: stop.clone(),
        failure: None,
        progress: HashMap::new(),
        units: HashMap::new(),
        building: HashMap::new(),
        sizes: HashMap::new(),
        buffered: 0,
        positions: Positions::default(),
        abandoned: HashSet::new(),
        rewinds: HashMap::new(),
        dead_lettered: HashMap::new(),
        partitions,
        erasures,
        max_block: Duration::from_secs_f64(config.max_block_secs.max(0.1)),
        turn_deadline: Instant::now(),
        rows: 0,
        files: 0,
        parquet_bytes: 0,
        json_bytes: 0,
    }));
    let mut cc = config.kafka.consumer_config(&config.group);
    if config.stop_at_end {
        cc.set("enable.partition.eof", "true");
    }
    let consumer = consumer::join(&cc, &config.topics.events, state.clone())?;
    tracing::info!(topic = %config.topics.events, store = %config.store.url, "archiver consuming");
    let roll_age = Duration::from_secs_f64(config.roll_secs.max(0.05));
    let started = Instant::now();
    let mut ends = EndOfPartitions::default();
    let mut batch: Vec<OwnedMessage> = Vec::with_capacity(ARCHIVER_BATCH);
    let mut last_scan = Instant::now();
    while !stop.is_stopped() {
        let (wait, linger) = (Duration::from_millis(100), Duration::from_millis(20));
        consumer::poll_batch(
            &consumer,
            &mut batch,
            ARCHIVER_BATCH,
            wait,
            linger,
            &mut ends,
        );
        let mut s = consumer::lock(&state);
        s.start_turn();
        let commit = consumer::committer(&consumer);
        for msg in &batch {
            s.take(msg);
            let p = msg.partition();
            if s.units
                .get(&p)
                .is_some_and(|u| u.bytes >= config.roll_bytes)
            {
                s.roll(&commit, p).or_else(stopping)?;
            }
            while s.buffered > config.max_buffer_bytes {
                // Units being built count until written: those already built go first (no
                // wait), then the largest being built, then the largest open unit rolls.
                if let Some(built) = s
                    .building
                    .iter()
                    .max_by_key(|(_, b)| (b.is_done(), b.json_bytes))
                    .map(|(p, _)| *p)
                {
                    s.settle(&commit, built).or_else(stopping)?;
                    continue;
                }
                let Some(largest) = s.units.iter().max_by_key(|(_, u)| u.bytes).map(|(p, _)| *p)
                else {
                    break;
                };
                s.roll(&commit, largest).or_else(stopping)?;
            }
        }
        // Units whose build is over are written now; the others on a later turn.
        let built: Vec<i32> = s
            .building
            .iter()
            .filter(|(_, b)| b.is_done())
            .map(|(p, _)| *p)
            .collect();
        for p in built {
            s.settle(&commit, p).or_else(stopping)?;
        }
        if last_scan.elapsed() >= Duration::from_millis(100) {
            last_scan = Instant::now();
            s.ready.beat();
            metrics::gauge!(metric::BUFFERED_BYTES).set(s.buffered as f64);
            let old: Vec<i32> = s
                .units
                .iter()
                .filter(|(_, u)| u.opened.elapsed() >= roll_age)
                .map(|(p, _)| *p)
                .collect();
            for p in old {
                s.roll(&commit, p).or_else(stopping)?;
            }
        }
        if let Some(e) = s.failure.take() {
            return Err(e);
        }
        s.apply_rewinds(&consumer, &config.topics.events);
        drop(s);
        // Only an idle poll can mean "all read": asking librdkafka for the assignment on
        // every batch costs more than archiving it.
        if config.stop_at_end && batch.is_empty() && ends.all_read(&consumer) {
            break;
        }
    }
    let mut s = consumer::lock(&state);
    let open: BTreeSet<i32> = s.units.keys().chain(s.building.keys()).copied().collect();
    let commit = consumer::committer(&consumer);
    let mut given_up = Vec::new();
    // Every open unit's build is queued first, so that the pool builds them side by side;
    // then each is written. No poll follows: each final roll and write has a budget of its
    // own. At a stop during an outage these are left unmarked and read again by the restart.
    for roll in [State::roll, State::settle] {
        for &p in &open {
            s.start_turn();
            match roll(&mut s, &commit, p) {
                Err(RollFailure::GaveUp { first }) => given_up.push((p, first)),
                other => other.or_else(stopping)?,
            }
        }
    }
    if !given_up.is_empty() && !stop.is_stopped() {
        // `--stop-at-end`: a catch-up that left ranges unarchived must not look complete.
        return Err(ArchiverError::Store(format!(
            "the object store took no unit of (partition, first offset) {given_up:?} within \
             --max-block-secs; those ranges stay unmarked and the next run archives them"
        )));
    }
    let summary = ArchiveSummary {
        elapsed_secs: started.elapsed().as_secs_f64(),
        rows: s.rows,
        files: s.files,
        parquet_bytes: s.parquet_bytes,
        json_bytes: s.json_bytes,
    };
    let fatal = s.outbox.fatal_error();
    drop(s);
    consumer.unsubscribe();
    // Stopped by a producer that failed for good: exit with its error, so the restart (a
    // fresh producer) archives what this run left unmarked.
    if let Some(reason) = fatal {
        return Err(pulse_service::outbox::OutboxError::Fatal(reason).into());
    }
    Ok(summary)
}

/// A progress failure as an object-store error, for the store's retry: a marker or note this
/// archiver cannot parse is retried (and reported by /readyz) rather than passed over.
fn progress_failed(e: progress::ProgressError) -> object_store::Error {
    match e {
        progress::ProgressError::Store(e) => e,
        other => object_store::Error::Generic {
            store: "archive progress",
            source: Box::new(other),
        },
    }
}

/// A roll given up because the process stops is not an error: the range is read again by the
/// restart. That is safe because the partition is then abandoned for the rest of the run (see
/// `State::abandoned`): no later record of it is taken and no later unit of it written, so no
/// marker passes the dropped range, also while the rest of a batch and the final rolls go on.
fn stopping(failure: RollFailure) -> Result<(), ArchiverError> {
    match failure {
        RollFailure::Stopped | RollFailure::GaveUp { .. } => Ok(()),
        RollFailure::Fatal(e) => Err(e),
    }
}

impl State {
    /// Starts the blocking budget of a turn of the loop (see `turn_deadline`).
    fn start_turn(&mut self) {
        self.turn_deadline = Instant::now() + self.max_block;
    }

    /// Buffers one record (or dead-letters it), unless the archive already has it.
    fn take(&mut self, msg: &OwnedMessage) {
        let p = msg.partition();
        if !self.positions.owns(p) || self.abandoned.contains(&p) || self.rewinds.contains_key(&p) {
            return;
        }
        let done = match self.progress.get(&p) {
            Some(started) => started.last(),
            None => match self.init_partition(p) {
                Ok(done) => done,
                Err(Interrupted::Stopped) => {
                    self.abandoned.insert(p);
                    return;
                }
                Err(Interrupted::OutOfTime) => {
                    self.rewinds.insert(p, msg.offset());
                    return;
                }
            },
        };
        // A unit being built will be archived (or, if it cannot be, read again from its
        // first offset): what it holds counts as done.
        let done = done.max(self.building.get(&p).map(|b| b.range.last));
        if done.is_some_and(|d| msg.offset() <= d) {
            return; // archived before a crash or a rebalance
        }
        if let Some(unit) = self.units.get(&p) {
            if msg.offset() <= unit.last {
                // The partition was revoked and given back within one batch, and its fetch
                // restarted from the commit: read it again from the lower offset into a fresh
                // unit, so that no record is in a unit twice and none is left out.
                self.rewinds.insert(p, unit.first.min(msg.offset()));
                return;
            }
        }
        let payload = msg.payload().unwrap_or_default();
        let unit = self.units.entry(p).or_insert_with(|| Unit {
            first: msg.offset(),
            last: msg.offset(),
            events: BTreeMap::new(),
            identities: Vec::new(),
            bytes: 0,
            opened: Instant::now(),
        });
        unit.last = msg.offset();
        let at = Placement {
            partition: p,
            partitions: self.partitions,
        };
        // The speed layer's identity records share the topic so that they are ordered with
        // the events; they are archived beside them, not as rows of `events`.
        let erasures = self.erasures.read();
        match TopicRecord::decode(msg.headers(), msg.key(), msg.payload(), at) {
            // An erased person's: its offset is in the unit's range, its row in no file.
            Ok(TopicRecord::Event(event)) if erasures.erases(&event) => {
                metrics::counter!(metric::ERASED).increment(1);
            }
            Ok(TopicRecord::Identity(record)) if erasures.erases_identity(&record) => {
                metrics::counter!(metric::ERASED).increment(1);
            }
            Ok(TopicRecord::Event(event)) => {
                unit.bytes += payload.len();
                self.buffered += payload.len();
                unit.events
                    .entry(event.timestamp.date_naive())
                    .or_insert_with(|| match self.sizes.get(&p) {
                        Some(size) => RowsBuilder::sized_like(p, size),
                        None => RowsBuilder::new(p, ROWS_PER_FILE_HINT),
                    })
                    .push(msg.offset(), &event);
            }
            Ok(TopicRecord::Identity(record)) => {
                unit.bytes += payload.len();
                self.buffered += payload.len();
                let written_at = msg
                    .timestamp()
                    .to_millis()
                    .and_then(chrono::DateTime::from_timestamp_millis)
                    .unwrap_or_else(chrono::Utc::now);
                unit.identities.push(ArchivedIdentity {
                    partition: p,
                    offset: msg.offset(),
                    written_at,
                    record,
                });
            }
            Err(_)
                if self
                    .dead_lettered
                    .get(&p)
                    .is_some_and(|o| o.contains(&msg.offset())) =>
            {
                // Dead-lettered before this range was given up and read again.
            }
            Err(reason) => {
                self.dead_lettered
                    .entry(p)
                    .or_default()
                    .insert(msg.offset());
                metrics::counter!(metric::DEAD_LETTERED).increment(1);
                tracing::warn!(partition = p, offset = msg.offset(), %reason, "record to dead-letter topic");
                let source = Source {
                    topic: msg.topic(),
                    partition: p,
                    offset: msg.offset(),
                };
                let key = msg.key().unwrap_or_default();
                self.outbox
                    .dead_letter(&self.dlq_topic, source, key, payload, &reason, &[]);
            }
        }
    }

    /// Reads the partition's progress from its markers and deletes the files of units that
    /// never got their marker (and superseded markers and notes), unless the process stops or
    /// the turn's blocking budget runs out first. Every other owned partition not started yet
    /// is started alongside: after an assignment of many partitions that is one round of
    /// object-store calls, not one per partition in a row (100 partitions took 3 s on a local
    /// directory, the consuming thread blocked throughout).
    fn init_partition(&mut self, p: i32) -> Result<Option<i64>, Interrupted> {
        let mut wanted: Vec<i32> = self
            .positions
            .owned()
            .filter(|q| {
                *q != p
                    && !self.progress.contains_key(q)
                    && !self.abandoned.contains(q)
                    && !self.rewinds.contains_key(q)
            })
            .collect();
        wanted.push(p);
        let store = self.store.clone();
        let deadline = self.turn_deadline;
        let read = self.retry("read progress", deadline, || {
            use futures::{StreamExt, TryStreamExt};
            let reads = wanted.clone().into_iter().map(|q| {
                let store = store.clone();
                async move {
                    let found = progress::read(store.as_ref(), q)
                        .await
                        .map_err(progress_failed)?;
                    for path in &found.orphans {
                        tracing::warn!(%path, "deleting file of an unfinished unit");
                    }
                    progress::tidy(store.as_ref(), &found)
                        .await
                        .map_err(progress_failed)?;
                    Ok::<_, object_store::Error>((q, found))
                }
            });
            futures::stream::iter(reads)
                .buffer_unordered(PARTITIONS_STARTED_AT_ONCE)
                .try_collect::<Vec<_>>()
        });
        // Stopped during an outage: the partitions stay uninitialised and nothing of them is
        // buffered; the restart reads them.
        for (q, found) in read? {
            self.started(q, found);
        }
        Ok(self.progress.get(&p).and_then(Started::last))
    }

    /// Takes the progress read of partition `p`.
    fn started(&mut self, p: i32, found: progress::PartitionProgress) {
        metrics::counter!(metric::PROGRESS_OBJECTS_READ).increment(found.objects_read);
        tracing::info!(
            partition = p,
            archived_up_to = ?found.last(),
            objects_read = found.objects_read,
            listed_archive = found.legacy,
            orphans_deleted = found.orphans.len(),
            "partition initialised from the object store"
        );
        // The next marker makes every marker but the highest obsolete (old-format markers
        // too: it carries the coverage they make up); the highest, one marker later.
        let mut markers: Vec<Path> = found.markers.values().cloned().collect();
        let newest = markers.pop();
        let obsolete = match found.legacy {
            true => markers,
            false => markers
                .into_iter()
                .rev()
                .take(progress::MARKERS_KEPT - 1)
                .collect(),
        };
        let started = Started {
            coverage: found.coverage,
            newest,
            obsolete,
        };
        self.progress.insert(p, started);
    }

    /// The partition's unit being built, no longer counted as buffered.
    fn take_building(&mut self, p: i32) -> Option<Building> {
        let building = self.building.remove(&p)?;
        self.buffered -= building.json_bytes;
        Some(building)
    }

    /// Rolls the partition's unit: the unit before it, if still being built, is written
    /// first (markers go in offset order), then this one's files start being built off the
    /// consuming thread; [`State::settle`] writes them. Nothing is rolled of an abandoned
    /// partition.
    fn roll(&mut self, commit: &dyn Commit, p: i32) -> Result<(), RollFailure> {
        self.settle(commit, p)?;
        // Its bytes stay counted in `buffered` until the unit is written (or dropped).
        let Some(unit) = self.units.remove(&p) else {
            return Ok(());
        };
        let range = FileRange {
            partition: p,
            first: unit.first,
            last: unit.last,
        };
        if let Some(largest) = unit.events.values().max_by_key(|rows| rows.len()) {
            self.sizes.insert(p, largest.size());
        }
        // A build that cannot be queued: stop before any marker passes the range, whose
        // events are gone from memory (the restart archives it).
        let range_bytes = unit.bytes;
        match Building::start(
            &self.builders,
            unit,
            range,
            self.compression,
            self.erasures.clone(),
        ) {
            Ok(building) => {
                self.building.insert(p, building);
                Ok(())
            }
            Err(e) => {
                self.buffered -= range_bytes;
                self.abandoned.insert(p);
                Err(RollFailure::Fatal(e))
            }
        }
    }

    /// Writes the partition's unit being built, if any (see [`State::write_unit`]), unless
    /// the partition was abandoned. A write given up at a stop abandons it, and so does one
    /// that failed for good: no later unit of the partition may be written in this run (not
    /// even by the revocation at the exit), or its marker would pass the failed range.
    fn settle(&mut self, commit: &dyn Commit, p: i32) -> Result<(), RollFailure> {
        if self.abandoned.contains(&p) {
            if let Some(unit) = self.units.remove(&p) {
                self.buffered -= unit.bytes;
            }
            self.take_building(p);
            return Err(RollFailure::Stopped);
        }
        let Some(building) = self.take_building(p) else {
            return Ok(());
        };
        let rolled = self.write_unit(commit, building);
        match rolled {
            Err(RollFailure::Stopped | RollFailure::Fatal(_)) => {
                self.abandoned.insert(p);
            }
            Err(RollFailure::GaveUp { first }) => {
                tracing::warn!(
                    partition = p,
                    first,
                    "archiving the unit given up for now; reading it again"
                );
                self.rewinds.insert(p, first);
                // Some of the unit's files may be in the store already, and the re-read unit
                // starts at the same offset but may end at another: an orphan of this one
                // would then count as committed beside it (duplicate rows) once the new
                // marker passes it. The partition is initialised again from the store before
                // the re-read takes a record, as after a crash: files beyond the marker go
                // (and a marker that did get through before the deadline is found and kept).
                self.progress.remove(&p);
            }
            _ => {}
        }
        rolled
    }

    /// Writes a rolled unit once its build is over: files, then the marker, then the commit.
    /// On any failure no marker is written, so the range stays unarchived and is read again.
    fn write_unit(&mut self, commit: &dyn Commit, building: Building) -> Result<(), RollFailure> {
        let (range, json_bytes) = (building.range, building.json_bytes);
        let p = range.partition;
        let built = match building.finish() {
            Ok(built) => built,
            Err(e) => {
                // The unit's events are gone from memory and a later marker would cover its
                // range: stop before writing one, so the restart archives it.
                tracing::error!(error = %e, partition = p, "building the unit's files failed; stopping before the range is passed");
                return Err(RollFailure::Fatal(e));
            }
        };
        let files = built.files;
        metrics::counter!(metric::ERASED).increment(built.erased as u64);
        let identity_count = built.identity_records;
        let deadline = self.turn_deadline;
        let gave_up = |why: Interrupted| match why {
            Interrupted::Stopped => RollFailure::Stopped,
            Interrupted::OutOfTime => RollFailure::GaveUp { first: range.first },
        };
        // Dead letters of this range must be in Kafka before the marker says it is done.
        let flushed = STORE_RETRY.run_blocking(
            &self.shutdown,
            "acknowledgement of dead letters",
            |e| !matches!(e, OutboxError::Fatal(_)),
            || {
                if Instant::now() > deadline {
                    return Ok(false);
                }
                let confirmed = self.outbox.confirm(Duration::from_secs(5));
                self.dead_letters.set(confirmed.is_ok());
                confirmed.map(|()| true)
            },
        );
        match flushed {
            Ok(true) => {}
            Ok(false) => return Err(gave_up(Interrupted::OutOfTime)),
            Err(_) => return Err(RollFailure::Stopped),
        }
        // A member that lost its partitions must not make their range look archived: the
        // new owner may have read the marker before this one and archive the range itself.
        let owned = || match commit.assignment_lost() {
            true => Err(Interrupted::OutOfTime),
            false => Ok(()),
        };
        let store = self.store.clone();
        // The note names the files before the first is written: if the marker never comes,
        // the partition's next start finds and deletes them without listing the archive.
        let note = (!files.is_empty()).then(|| progress::note_path(range));
        if let Some(note) = &note {
            let paths: Vec<Path> = files.iter().map(|(path, _, _)| path.clone()).collect();
            let body = PutPayload::from(progress::note_body(&paths));
            owned().map_err(gave_up)?;
            self.retry("write pending note", deadline, || {
                let (store, note, body) = (store.clone(), note.clone(), body.clone());
                async move { store.put(&note, body).await.map(|_| ()) }
            })
            .map_err(gave_up)?;
        }
        for (path, bytes, rows) in files {
            let len = bytes.len() as u64;
            let payload = PutPayload::from(bytes);
            owned().map_err(gave_up)?;
            self.retry("upload", deadline, || {
                let (store, path, payload) = (store.clone(), path.clone(), payload.clone());
                async move { store.put(&path, payload).await.map(|_| ()) }
            })
            .map_err(gave_up)?;
            self.rows += rows as u64;
            self.files += 1;
            self.parquet_bytes += len;
            metrics::counter!(metric::ROWS).increment(rows as u64);
            metrics::counter!(metric::FILES).increment(1);
            metrics::counter!(metric::PARQUET_BYTES).increment(len);
        }
        self.json_bytes += json_bytes as u64;
        metrics::counter!(metric::JSON_BYTES).increment(json_bytes as u64);
        // The marker carries the partition's whole coverage, so the ones before it can go.
        let (mut coverage, newest, mut obsolete) = match self.progress.remove(&p) {
            Some(s) => (s.coverage, s.newest, s.obsolete),
            None => Default::default(),
        };
        let before = coverage.clone();
        coverage.add(range.first, range.last);
        let marker = progress::marker_path(p, range.last);
        let body = PutPayload::from(progress::marker_body(&coverage));
        let written = owned().and_then(|()| {
            self.retry("write marker", deadline, || {
                let (store, marker, body) = (store.clone(), marker.clone(), body.clone());
                async move { store.put(&marker, body).await.map(|_| ()) }
            })
        });
        if let Err(why) = written {
            self.progress.insert(
                p,
                Started {
                    coverage: before,
                    newest,
                    obsolete,
                },
            );
            return Err(gave_up(why));
        }
        obsolete.extend(note);
        let obsolete = self.delete_obsolete(obsolete, deadline);
        self.progress.insert(
            p,
            Started {
                coverage,
                newest: Some(marker),
                obsolete: obsolete.into_iter().chain(newest).collect(),
            },
        );
        if let Some(offsets) = self.dead_lettered.get_mut(&p) {
            *offsets = offsets.split_off(&(range.last + 1));
        }
        metrics::counter!(metric::UNITS).increment(1);
        metrics::counter!(metric::IDENTITY_RECORDS).increment(identity_count as u64);
        metrics::gauge!(metric::BUFFERED_BYTES).set(self.buffered as f64);
        tracing::debug!(
            partition = p,
            first = range.first,
            last = range.last,
            "unit archived"
        );
        if let Err(e) = self.positions.commit(commit, &[(p, range.last + 1)]) {
            tracing::debug!(error = %e, "commit failed (progress is in the object store)");
        }
        Ok(())
    }

    /// Deletes objects a marker made obsolete, in one try within the turn's budget: they are
    /// harmless where they are (the highest marker wins; a covered note is stale), so what
    /// could not be deleted is returned and tried again after the next unit.
    fn delete_obsolete(&self, paths: Vec<Path>, deadline: Instant) -> Vec<Path> {
        if paths.is_empty() {
            return paths;
        }
        let store = self.store.clone();
        let attempt = progress::delete_all(store.as_ref(), paths.clone());
        let done = self
            .runtime
            .block_on(async { tokio::time::timeout_at(deadline.into(), attempt).await });
        match done {
            Ok(Ok(())) => Vec::new(),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "deleting superseded progress objects failed; later");
                paths
            }
            Err(_) => paths,
        }
    }

    /// Runs an object-store operation until it succeeds (the archive may lag, it must not
    /// skip), the process stops, or `deadline` passes: `Err` says which, the work not done.
    fn retry<T, F, Fut>(&self, what: &str, deadline: Instant, op: F) -> Result<T, Interrupted>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        let attempt = || {
            let call = op();
            let health = self.store_health.clone();
            async move {
                let result = call.await;
                health.observe(&result, metric::STORE_FAILURES);
                result
            }
        };
        let run = STORE_RETRY.run(&self.shutdown, what, |_| true, attempt);
        let timed = self
            .runtime
            .block_on(async { tokio::time::timeout_at(deadline.into(), run).await });
        match timed {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(Interrupted::Stopped),
            Err(_) => Err(Interrupted::OutOfTime),
        }
    }

    /// Seeks the partitions whose work was given up back to where their re-read starts.
    fn apply_rewinds(&mut self, consumer: &consumer::GroupConsumer<State>, topic: &str) {
        let rewinds: Vec<(i32, i64)> = self.rewinds.drain().collect();
        for (p, at) in rewinds {
            if !self.positions.owns(p) {
                continue;
            }
            if let Some(unit) = self.units.remove(&p) {
                self.buffered -= unit.bytes;
            }
            match consumer.seek(topic, p, Offset::Offset(at), Duration::from_secs(10)) {
                Ok(()) => tracing::info!(partition = p, offset = at, "reading the range again"),
                Err(e) => {
                    tracing::warn!(partition = p, offset = at, error = %e, "seek failed; trying again");
                    self.rewinds.insert(p, at);
                }
            }
        }
    }
}
