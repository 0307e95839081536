//! Writing dirty profiles to the profile store in the background, and what each document's
//! write came to.
//!
//! One flush runs at a time, on the engine's runtime, while the polling thread goes on
//! folding. The documents and the read positions are snapshotted when it starts: events folded
//! meanwhile are not in it, and their offsets are not committed by it. A flush that failed is
//! tried again after the next wait of the retry policy, not a whole flush interval later.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pulse_service::RetryPolicy;
use tokio::runtime::Runtime;

use crate::store::{DocWrite, DocumentStore, ItemOutcome};

/// A profile document to write, and the partition of the events folded into it.
pub(crate) struct Pending {
    pub write: DocWrite,
    pub partition: i32,
}

/// What a finished flush did.
#[derive(Debug, Default)]
pub(crate) struct FlushReport {
    pub docs: usize,
    pub written: usize,
    /// Profiles whose write failed for now (429, 5xx, unreachable): dirty again.
    pub retry: Vec<String>,
    /// Partitions with a document not written: not committed by this flush.
    pub failed: HashSet<i32>,
    /// Partitions with a newer stored document (409): our state is behind, re-read them.
    pub stale: HashSet<i32>,
    /// How many documents were found stale.
    pub stale_docs: usize,
    /// Documents refused for good (a mapping error, say), with the reason and partition.
    pub rejected: Vec<(DocWrite, i32, String)>,
    pub first_error: Option<String>,
    /// Read positions when the flush started: what it may commit.
    pub positions: Vec<(i32, i64)>,
    pub took: Duration,
}

impl FlushReport {
    /// The positions of partitions whose documents were all stored, refused for good
    /// (dead-lettered) or found stale: what this flush may commit, unless the partition is
    /// re-read (the caller decides that, since a stale partition stays re-read across flushes).
    pub fn positions_written(&self) -> impl Iterator<Item = (i32, i64)> + '_ {
        self.positions
            .iter()
            .copied()
            .filter(|(p, _)| !self.failed.contains(p))
    }
}

type Outcomes = Vec<Result<ItemOutcome, String>>;

struct InFlight {
    task: tokio::task::JoinHandle<Outcomes>,
    /// The documents, shared with the task: one refused for good is dead-lettered.
    writes: Arc<Vec<DocWrite>>,
    partitions: Vec<i32>,
    positions: Vec<(i32, i64)>,
    started: Instant,
}

/// The flush in flight, if any, and when a failed one may be tried again.
pub(crate) struct Flusher<S> {
    store: S,
    runtime: Arc<Runtime>,
    /// Documents per `_bulk` request.
    chunk: usize,
    retry: RetryPolicy,
    in_flight: Option<InFlight>,
    /// The waits before the next retries of a failing flush; `None` after a success.
    retries: Option<Box<dyn Iterator<Item = Duration> + Send>>,
    retry_at: Instant,
}

impl<S: DocumentStore> Flusher<S> {
    pub fn new(store: S, runtime: Arc<Runtime>, chunk: usize, retry: RetryPolicy) -> Self {
        Self {
            store,
            runtime,
            chunk: chunk.max(1),
            retry,
            in_flight: None,
            retries: None,
            retry_at: Instant::now(),
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// How many documents the flush in flight is writing.
    pub fn in_flight(&self) -> usize {
        self.in_flight.as_ref().map_or(0, |f| f.partitions.len())
    }

    pub fn is_idle(&self) -> bool {
        self.in_flight.is_none()
    }

    /// No flush in flight, and the wait after a failed one is over.
    pub fn may_start(&self) -> bool {
        self.is_idle() && Instant::now() >= self.retry_at
    }

    /// Whether the last flush failed: the next one is due when its wait is over.
    pub fn is_retrying(&self) -> bool {
        self.retries.is_some()
    }

    /// How long until a failed flush may be tried again.
    pub fn retry_in(&self) -> Duration {
        self.retry_at.saturating_duration_since(Instant::now())
    }

    /// Starts writing `pending` in the background; `positions` are what it may commit.
    /// Ignored if a flush is in flight (the caller checks [`Flusher::is_idle`]).
    pub fn start(&mut self, pending: Vec<Pending>, positions: Vec<(i32, i64)>) {
        if self.in_flight.is_some() {
            return;
        }
        let (writes, partitions): (Vec<DocWrite>, Vec<i32>) =
            pending.into_iter().map(|p| (p.write, p.partition)).unzip();
        let writes = Arc::new(writes);
        let (store, shared, chunk) = (self.store.clone(), writes.clone(), self.chunk);
        let task = self
            .runtime
            .spawn(async move { write_all(&store, &shared, chunk).await });
        self.in_flight = Some(InFlight {
            task,
            writes,
            partitions,
            positions,
            started: Instant::now(),
        });
    }

    /// The report of the flush in flight once it is done (waiting for it with `wait`), and
    /// the retry schedule moved on: the next wait after a failure, reset after a success.
    pub fn finish(&mut self, wait: bool) -> Option<FlushReport> {
        if !wait && !self.in_flight.as_ref()?.task.is_finished() {
            return None;
        }
        let flight = self.in_flight.take()?;
        let outcomes = self.runtime.block_on(flight.task).unwrap_or_else(|e| {
            vec![Err(format!("flush task failed: {e}")); flight.partitions.len()]
        });
        let writes = Arc::try_unwrap(flight.writes).unwrap_or_else(|shared| (*shared).clone());
        let mut report = FlushReport {
            docs: writes.len(),
            positions: flight.positions,
            took: flight.started.elapsed(),
            ..FlushReport::default()
        };
        for ((write, partition), outcome) in writes.into_iter().zip(flight.partitions).zip(outcomes)
        {
            match outcome {
                Ok(ItemOutcome::Written) => report.written += 1,
                Ok(ItemOutcome::Stale) => {
                    report.stale.insert(partition);
                    report.stale_docs += 1;
                }
                Ok(ItemOutcome::Rejected(reason)) => {
                    report.rejected.push((write, partition, reason))
                }
                Ok(ItemOutcome::Retry(reason)) | Err(reason) => {
                    report.failed.insert(partition);
                    report.retry.push(write.id);
                    report.first_error.get_or_insert(reason);
                }
            }
        }
        if report.first_error.is_some() {
            self.fail();
        } else {
            self.retries = None;
            self.retry_at = Instant::now();
        }
        Some(report)
    }

    /// A flush failed or could not start: the next may start after the next wait.
    pub fn fail(&mut self) {
        let policy = self.retry;
        let wait = self
            .retries
            .get_or_insert_with(|| Box::new(policy.delays()))
            .next()
            .unwrap_or(policy.max);
        self.retry_at = Instant::now() + wait;
    }
}

/// Writes documents in `_bulk` chunks, two requests at a time; one outcome per document.
async fn write_all<S: DocumentStore>(store: &S, writes: &[DocWrite], chunk: usize) -> Outcomes {
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
