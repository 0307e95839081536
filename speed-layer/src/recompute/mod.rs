//! Recompute: profiles rebuilt from the master dataset into a new index, verified, promoted
//! with one alias switch, rolled back.
//!
//! A cut-off is a vector of offsets, not a time. The archive's rows carry their Kafka
//! partition and offset, so each partition is folded in offset order from the archive, then
//! from Kafka where the archive ends, up to the live layer's commit, by the live layer's own
//! state and models ([`run`]). Documents carry the same watermarks and external versions as
//! the live layer writes, so when the live layer, stopped and started again, resumes at its
//! commit against the new index, the handover is exact ([`promote`]).
//!
//! - [`plan`]: what will be read, per partition, and the retention gaps that refuse a run;
//! - [`run`]: the fold, resumable through the group `recompute-<index>`, with its progress
//!   bars (`progress`) and the archive read one unit ahead (`read_ahead`);
//! - [`verify`]: every document of the new index against the live one;
//! - [`promote`]: catch up, switch the alias, record the previous index; and roll back;
//! - [`cleanup`]: indices no alias points to, and their groups;
//! - [`indices`]: the index, the alias and the record a promotion leaves;
//! - [`kafka`]: partitions, retained offsets, group commits and members;
//! - [`lease`]: the lock a run, a promote, a rollback and a cleanup hold on an index;
//! - [`unlink`]: a device split back from the person it was merged into, both refolded.

pub mod cleanup;
pub mod indices;
pub mod kafka;
pub mod lease;
pub mod plan;
mod progress;
pub mod promote;
mod read_ahead;
pub mod run;
pub mod unlink;
pub mod verify;

pub use cleanup::{cleanup, Cleanup, CleanupArgs};
pub use plan::Plan;
pub use promote::{promote, rollback, Switch};
pub use run::{run, RunSummary};
pub use verify::{verify, Verification};

use crate::config::SpeedConfig;

/// The poison journal of the index a run is folding now: set by the run, read by the panic
/// hook (`pulse-speed` installs [`record_panic`] before it knows which index that is; a
/// rollback folds the previous one).
static JOURNAL: std::sync::Mutex<Option<crate::poison::PoisonJournal>> =
    std::sync::Mutex::new(None);

fn set_journal(journal: crate::poison::PoisonJournal) {
    *JOURNAL.lock().unwrap_or_else(|p| p.into_inner()) = Some(journal);
}

/// The panic hook's last words: journals the record being folded, if a run is folding one.
pub fn record_panic(message: &str) {
    let journal = JOURNAL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(journal) = journal.as_ref() {
        journal.record_panic(message);
    }
}

/// Where history comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// The Parquet archive, then Kafka from where it ends.
    Archive,
    /// Kafka only, from the earliest offset it holds.
    Kafka,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RecomputeArgs {
    /// The live layer's settings: the same models, dedupe and flush flags give the same
    /// profiles; `--group` is the live group whose commit bounds the recompute.
    #[command(flatten)]
    pub speed: SpeedConfig,
    /// The index to build (behind no alias), e.g. profiles-v2.
    #[arg(id = "recompute_index", long = "index", env = "PULSE_RECOMPUTE_INDEX")]
    pub index: String,
    #[arg(long, env = "PULSE_RECOMPUTE_SOURCE", value_enum, default_value_t = Source::Archive)]
    pub source: Source,
    #[command(flatten)]
    pub archive: pulse_archive::store::StoreArgs,
    /// Leave room for live traffic: fold at most this many events per second (0: no limit).
    #[arg(long, env = "PULSE_RECOMPUTE_MAX_EVENTS_PER_SEC", default_value_t = 0)]
    pub max_events_per_sec: u64,
    /// Fault injection for the kill test: the process SIGKILLs itself when it is about to
    /// fold this record (`partition:offset`), so a kill lands at a chosen point of the run
    /// whatever the machine's speed. Never set it in production.
    #[arg(long, env = "PULSE_FAILPOINT_RECOMPUTE_KILL_AT", hide = true, value_parser = parse_position)]
    pub failpoint_kill_at: Option<(i32, i64)>,
    /// Not a flag: a recompute of a few profiles only (see [`Scope`]).
    #[arg(skip)]
    pub scope: Option<Scope>,
}

/// A recompute of a few profiles (an unlink's refold): the partitions read, and the profiles
/// whose records are folded; any other record only moves the position.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub partitions: std::collections::BTreeSet<i32>,
    pub ids: std::collections::HashSet<String>,
}

/// `partition:offset`.
fn parse_position(s: &str) -> Result<(i32, i64), String> {
    let (p, o) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected partition:offset"))?;
    let p = p.parse().map_err(|e| format!("partition {p:?}: {e}"))?;
    let o = o.parse().map_err(|e| format!("offset {o:?}: {e}"))?;
    Ok((p, o))
}

impl RecomputeArgs {
    /// The group whose commits are this recompute's progress.
    pub fn group(&self) -> String {
        format!("recompute-{}", self.index)
    }

    /// The journal of records that made a run of this index panic (see [`crate::poison`]):
    /// the next run passes them over instead of panicking on them again at every resume.
    pub fn poison_journal(&self) -> crate::poison::PoisonJournal {
        crate::poison::PoisonJournal::new(
            &self.speed.state_dir,
            &self.speed.topics.events,
            &self.group(),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecomputeError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("elasticsearch: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("archive: {0}")]
    Archive(String),
    #[error("{0}")]
    Engine(#[from] crate::engine::EngineError),
    #[error("{0}")]
    Refused(String),
    #[error("runtime: {0}")]
    Io(#[from] std::io::Error),
}

impl From<object_store::Error> for RecomputeError {
    fn from(e: object_store::Error) -> Self {
        RecomputeError::Archive(e.to_string())
    }
}

impl From<pulse_archive::progress::ProgressError> for RecomputeError {
    fn from(e: pulse_archive::progress::ProgressError) -> Self {
        RecomputeError::Archive(e.to_string())
    }
}

impl From<pulse_archive::store::OpenError> for RecomputeError {
    fn from(e: pulse_archive::store::OpenError) -> Self {
        RecomputeError::Archive(e.to_string())
    }
}
