//! The archive's units, fetched and decoded on a thread of their own, one unit ahead of the
//! fold.
//!
//! Fetching and decoding a unit's Parquet files costs about three times folding its events
//! (`bench/recompute`: 0.77 s against 0.26 s for 500,000 events). Done in turn, the fold waits
//! for every file while a core sits idle; read ahead, both cores work. The channel holds one
//! unit, so at most two units are in memory beyond the one being folded, whatever the
//! archive's size.

use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use object_store::{ObjectStore, ObjectStoreExt};
use pulse_archive::identity_file::{self, ArchivedIdentity};
use pulse_archive::parquet_file::Archived;
use pulse_archive::reader;
use tokio::runtime::Runtime;

use super::plan::Unit;
use super::RecomputeError;

/// One unit's rows, per file (each file's rows in file order).
#[derive(Debug, Default)]
pub struct UnitRows {
    pub events: Vec<Vec<Archived>>,
    pub identities: Vec<Vec<ArchivedIdentity>>,
}

/// Units read in the order given, ahead of whoever takes them.
pub struct ReadAhead {
    /// `None` once dropped, which ends the thread at its next send.
    rx: Option<Receiver<Result<UnitRows, RecomputeError>>>,
    thread: Option<JoinHandle<()>>,
}

impl ReadAhead {
    /// Starts reading `units` in order (fetches run on `runtime`, decoding on the thread).
    pub fn spawn(
        runtime: Arc<Runtime>,
        store: Arc<dyn ObjectStore>,
        units: Vec<Unit>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("recompute-read".into())
            .spawn(move || {
                for unit in &units {
                    let read = read_unit(&runtime, store.as_ref(), unit);
                    let failed = read.is_err();
                    // A receiver gone (the fold stopped or failed) ends the reading.
                    if tx.send(read).is_err() || failed {
                        return;
                    }
                }
            })?;
        Ok(Self {
            rx: Some(rx),
            thread: Some(thread),
        })
    }

    /// The next unit's rows, waiting for them; `None` after the last unit (or the first
    /// error, which was returned).
    pub fn next_unit(&self) -> Option<Result<UnitRows, RecomputeError>> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for ReadAhead {
    /// Waits for the thread, which stops at its next send: a stop does not leave it fetching
    /// beside the final flush for longer than one unit.
    fn drop(&mut self) {
        drop(self.rx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Every file of `unit`, fetched and decoded.
fn read_unit(
    runtime: &Runtime,
    store: &dyn ObjectStore,
    unit: &Unit,
) -> Result<UnitRows, RecomputeError> {
    let fetch = |path: &object_store::path::Path| {
        runtime.block_on(async { store.get(path).await?.bytes().await })
    };
    let mut out = UnitRows::default();
    for file in &unit.files {
        let rows = reader::read(fetch(&file.path)?)
            .map_err(|e| RecomputeError::Archive(format!("{}: {e}", file.path)))?;
        out.events.push(rows);
    }
    for file in &unit.identity_files {
        let rows = identity_file::read(fetch(&file.path)?)
            .map_err(|e| RecomputeError::Archive(format!("{}: {e}", file.path)))?;
        out.identities.push(rows);
    }
    Ok(out)
}
