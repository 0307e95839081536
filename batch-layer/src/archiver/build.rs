//! A rolled unit's files built off the consuming thread.
//!
//! Building a unit's Parquet files (its columns finished, erased people's rows filtered out,
//! then encoded and compressed) is most of what the archiver computes besides parsing records;
//! done on the consuming thread it stopped the consumption for as long. A rolled unit is
//! built by one of a few threads of the [`BuildPool`] while the consuming thread goes on
//! reading; its files are written, then its marker, by the consuming thread once the build is
//! done (or before anything else of its partition is written: markers go in offset order). At
//! most one unit per partition is being built, so the memory is bounded like the units'.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use arrow::record_batch::RecordBatch;
use chrono::NaiveDate;
use object_store::path::Path;
use parquet::basic::Compression;
use pulse_archive::erase::{self, FileKind};
use pulse_service::erasures::ErasureFeed;

use super::{ArchiverError, Unit};
use crate::identity_file::{self, ArchivedIdentity};
use crate::layout::{self, FileRange};
use crate::parquet_file::{self, ParquetError, RowsBuilder};

/// A unit's files, ready to be written.
pub(super) struct BuiltUnit {
    /// Path, bytes and rows (0 for an identity file) of each file.
    pub files: Vec<(Path, Vec<u8>, usize)>,
    /// Events and identity records of people erased since they were buffered, left out.
    pub erased: usize,
    pub identity_records: usize,
}

type Job = Box<dyn FnOnce() + Send>;

/// The threads that build rolled units, one per core, for the life of the archiver.
///
/// A thread per unit made the stop's tail (every partition's open unit rolled at once: a
/// hundred) a hundred threads encoding side by side on two cores, each in fresh memory: the
/// kernel zeroing the pages they touched was a third of the building threads' time. A few
/// long-lived threads build the queued units in turn and reuse their allocator's pages.
pub(super) struct BuildPool {
    jobs: Option<mpsc::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl BuildPool {
    /// `threads` building threads (at least one).
    pub fn new(threads: usize) -> Result<Self, ArchiverError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let workers = (0..threads.max(1))
            .map(|i| {
                let queue = Arc::clone(&queue);
                std::thread::Builder::new()
                    .name(format!("archive-build-{i}"))
                    .spawn(move || loop {
                        // The lock is held only to take the next job, not while it runs.
                        let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        match job {
                            Ok(job) => job(),
                            Err(mpsc::RecvError) => return,
                        }
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            jobs: Some(jobs),
            workers,
        })
    }

    /// One thread per core the process may use.
    pub fn per_core() -> Result<Self, ArchiverError> {
        Self::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

impl Drop for BuildPool {
    fn drop(&mut self) {
        // Closing the queue ends each thread once it has built what was queued.
        drop(self.jobs.take());
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Where a build leaves its result for the consuming thread.
#[derive(Default)]
struct Outcome {
    result: Mutex<Option<Result<BuiltUnit, ArchiverError>>>,
    done: Condvar,
}

/// Hands a build's result to its [`Building`]; a job dropped before it ran (its threads gone)
/// hands over an error instead, so that nobody waits for it forever.
struct Report {
    outcome: Option<Arc<Outcome>>,
    range: FileRange,
}

impl Report {
    /// Whether the [`Building`] is gone: the result would not be read.
    fn unwanted(&self) -> bool {
        self.outcome
            .as_ref()
            .is_none_or(|outcome| Arc::strong_count(outcome) == 1)
    }

    fn send(mut self, built: Result<BuiltUnit, ArchiverError>) {
        self.deliver(built);
    }

    fn deliver(&mut self, built: Result<BuiltUnit, ArchiverError>) {
        if let Some(outcome) = self.outcome.take() {
            *outcome
                .result
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(built);
            outcome.done.notify_all();
        }
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        let range = self.range;
        self.deliver(Err(failed(
            range,
            "the unit was dropped before it was built",
        )));
    }
}

/// The error of a unit whose files could not be built.
fn failed(range: FileRange, message: &str) -> ArchiverError {
    ArchiverError::Parquet {
        partition: range.partition,
        first: range.first,
        last: range.last,
        message: message.into(),
    }
}

/// A rolled unit whose files are being built (or wait for a building thread).
pub(super) struct Building {
    pub range: FileRange,
    /// The unit's JSON bytes, for the archiver's counters.
    pub json_bytes: usize,
    outcome: Arc<Outcome>,
}

impl Building {
    /// Queues `unit`'s files to be built as `range` by the pool.
    pub fn start(
        pool: &BuildPool,
        unit: Unit,
        range: FileRange,
        compression: Compression,
        erasures: ErasureFeed,
    ) -> Result<Self, ArchiverError> {
        let json_bytes = unit.bytes;
        let (events, identities) = (unit.events, unit.identities);
        let outcome = Arc::new(Outcome::default());
        let report = Report {
            outcome: Some(Arc::clone(&outcome)),
            range,
        };
        let job: Job = Box::new(move || {
            // Nobody waits for this unit any more (its partition was taken away, or the
            // archiver is stopping on an error): building it would only delay the exit.
            if report.unwanted() {
                return;
            }
            // The service binaries exit on a panic before it unwinds
            // (`pulse_core::telemetry::exit_on_panic`), which is as safe: the marker past the
            // range is never written. Where a panic does unwind (tests, other embedders), it
            // is the unit's build failure.
            let built = std::panic::catch_unwind(AssertUnwindSafe(|| {
                build(events, identities, range, compression, &erasures)
            }))
            .unwrap_or_else(|_| Err(failed(range, "building the unit's files panicked")));
            report.send(built);
        });
        let queued = pool.jobs.as_ref().map(|jobs| jobs.send(job));
        if !matches!(queued, Some(Ok(()))) {
            return Err(failed(range, "the threads building units' files are gone"));
        }
        Ok(Self {
            range,
            json_bytes,
            outcome,
        })
    }

    /// Whether the build is over (waiting for it would not block).
    pub fn is_done(&self) -> bool {
        self.lock().is_some()
    }

    /// The built files, once the build is over (waits for it).
    pub fn finish(self) -> Result<BuiltUnit, ArchiverError> {
        let mut result = self.lock();
        loop {
            if let Some(built) = result.take() {
                return built;
            }
            result = self
                .outcome
                .done
                .wait(result)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Result<BuiltUnit, ArchiverError>>> {
        self.outcome
            .result
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn build(
    events: BTreeMap<NaiveDate, RowsBuilder>,
    mut identity_rows: Vec<ArchivedIdentity>,
    range: FileRange,
    compression: Compression,
    erasures: &ErasureFeed,
) -> Result<BuiltUnit, ArchiverError> {
    let mut erased = 0;
    let mut files = Vec::with_capacity(events.len() + 1);
    for (dt, mut rows) in events {
        // Erasures recorded since the unit's records were buffered: left out now. The feed's
        // lock only while filtering: the encoding that follows needs none.
        let built = build_parquet(&mut rows, compression, range, |batch| {
            let erasures = erasures.read();
            if erasures.is_empty() {
                return Ok(batch);
            }
            let (batch, removed) = erase::filter_batch(batch, FileKind::Events, &erasures)?;
            erased += removed;
            Ok(batch)
        })?;
        if let Some((bytes, rows)) = built {
            files.push((layout::data_path(dt, range), bytes, rows));
        }
    }
    {
        let erasures = erasures.read();
        let before = identity_rows.len();
        identity_rows.retain(|r| !erasures.erases_identity(&r.record));
        erased += before - identity_rows.len();
    }
    let identity_records = identity_rows.len();
    let mut identities: BTreeMap<NaiveDate, Vec<ArchivedIdentity>> = BTreeMap::new();
    for row in identity_rows {
        identities
            .entry(row.written_at.date_naive())
            .or_default()
            .push(row);
    }
    for (dt, rows) in &identities {
        let bytes =
            identity_file::write(rows, compression).map_err(|e| failed(range, &e.to_string()))?;
        files.push((layout::identity_path(*dt, range), bytes, 0));
    }
    Ok(BuiltUnit {
        files,
        erased,
        identity_records,
    })
}

/// The Parquet bytes of one file of a unit and its row count, its rows passed through
/// `filter` first (erasures); `None` when no row is left. `PULSE_FAILPOINT_PARQUET_OFFSET=<offset>`
/// (tests only) makes the build of a unit that holds that offset fail, as a bug in the writer
/// would.
fn build_parquet(
    rows: &mut RowsBuilder,
    compression: Compression,
    range: FileRange,
    filter: impl FnOnce(RecordBatch) -> Result<RecordBatch, ParquetError>,
) -> Result<Option<(Vec<u8>, usize)>, ArchiverError> {
    static FAIL_AT: std::sync::OnceLock<Option<i64>> = std::sync::OnceLock::new();
    let fail_at = *FAIL_AT.get_or_init(|| {
        std::env::var("PULSE_FAILPOINT_PARQUET_OFFSET")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if fail_at.is_some_and(|o| (range.first..=range.last).contains(&o)) {
        return Err(failed(range, "failpoint PULSE_FAILPOINT_PARQUET_OFFSET"));
    }
    let batch = rows
        .finish()
        .and_then(filter)
        .map_err(|e| failed(range, &e.to_string()))?;
    if batch.num_rows() == 0 {
        return Ok(None);
    }
    let bytes = parquet_file::write_batch(&batch, compression)
        .map_err(|e| failed(range, &e.to_string()))?;
    Ok(Some((bytes, batch.num_rows())))
}
