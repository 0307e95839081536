//! What a recompute will read, per partition: the archive's units from where the recompute
//! stands (its own group's commit) up to the live layer's commit, then Kafka from the archive's
//! end to the same bound. A partition whose next offset Kafka no longer holds and the archive
//! does not cover is a gap: the plan names it and `run` refuses, since folding on would
//! silently drop that history.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use object_store::ObjectStore;
use pulse_archive::layout::{self, ArchiveFile, FileRange};

use super::kafka::{self, Retained};
use super::{RecomputeArgs, RecomputeError, Source};

/// One archived offset range of a partition, with the files (one per event date) it wrote.
#[derive(Debug, Clone)]
pub struct Unit {
    pub range: FileRange,
    pub files: Vec<ArchiveFile>,
}

#[derive(Debug, Clone)]
pub struct PartitionPlan {
    pub partition: i32,
    /// The next offset to fold: where this recompute stands (0 before it started).
    pub resume: i64,
    /// The archive units still to fold, in offset order.
    pub units: Vec<Unit>,
    /// Kafka is read from here…
    pub kafka_from: i64,
    /// …up to here (exclusive): the live layer's commit, or the topic's end without one.
    pub bound: i64,
    /// The first offset Kafka still holds.
    pub low: i64,
}

impl PartitionPlan {
    /// Offsets the archive units span (an upper bound of their rows: dead-lettered records
    /// take an offset and no row).
    pub fn archive_offsets(&self) -> i64 {
        self.units
            .iter()
            .map(|u| (u.range.last.min(self.bound - 1) - u.range.first.max(self.resume) + 1).max(0))
            .sum()
    }

    pub fn archive_bytes(&self) -> u64 {
        self.units
            .iter()
            .flat_map(|u| &u.files)
            .map(|f| f.size)
            .sum()
    }

    pub fn kafka_offsets(&self) -> i64 {
        (self.bound - self.kafka_from).max(0)
    }

    /// Kafka no longer holds offsets the recompute must read and the archive lacks.
    pub fn gap(&self) -> Option<(i64, i64)> {
        (self.kafka_from < self.low && self.kafka_from < self.bound)
            .then_some((self.kafka_from, self.low.min(self.bound) - 1))
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub index: String,
    pub partitions: Vec<PartitionPlan>,
}

impl Plan {
    pub fn gaps(&self) -> Vec<(i32, i64, i64)> {
        self.partitions
            .iter()
            .filter_map(|p| p.gap().map(|(a, b)| (p.partition, a, b)))
            .collect()
    }

    pub fn offsets(&self) -> i64 {
        self.partitions
            .iter()
            .map(|p| p.archive_offsets() + p.kafka_offsets())
            .sum()
    }

    /// The refusal of a plan with gaps, naming every partition and range.
    pub fn check(&self) -> Result<(), RecomputeError> {
        let gaps = self.gaps();
        if gaps.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = gaps
            .iter()
            .map(|(p, a, b)| format!("partition {p} offsets {a}..={b}"))
            .collect();
        Err(RecomputeError::Refused(format!(
            "Kafka retention already dropped history that the archive does not cover: {}. \
             Recomputing would silently lose it; restore the archive of these ranges (or \
             accept the loss with a new index built from what is left, --source kafka after \
             deleting this recompute's group)",
            list.join(", ")
        )))
    }

    /// The plan as a table, with the time it takes at `rate` events/s (if known).
    pub fn render(&self, rate: Option<f64>) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "recompute into index {}", self.index);
        let _ = writeln!(
            out,
            "{:>9}  {:>12}  {:>24}  {:>9}  {:>24}  gap",
            "partition", "resume at", "archive offsets (units)", "MiB", "kafka offsets"
        );
        for p in &self.partitions {
            let archive = match (p.units.first(), p.units.last()) {
                (Some(a), Some(b)) => format!(
                    "{}..={} ({})",
                    a.range.first.max(p.resume),
                    b.range.last.min(p.bound - 1),
                    p.units.len()
                ),
                _ => "-".into(),
            };
            let kafka = match p.kafka_offsets() {
                0 => "-".into(),
                _ => format!("{}..{}", p.kafka_from, p.bound),
            };
            let gap = p
                .gap()
                .map(|(a, b)| format!("{a}..={b} NOT RETAINED"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{:>9}  {:>12}  {:>24}  {:>9.1}  {:>24}  {gap}",
                p.partition,
                p.resume,
                archive,
                p.archive_bytes() as f64 / 1048576.0,
                kafka
            );
        }
        let (archived, from_kafka): (i64, i64) = self
            .partitions
            .iter()
            .map(|p| (p.archive_offsets(), p.kafka_offsets()))
            .fold((0, 0), |(a, k), (x, y)| (a + x, k + y));
        let bytes: u64 = self.partitions.iter().map(|p| p.archive_bytes()).sum();
        let _ = writeln!(
            out,
            "total: at most {archived} events from {:.1} MiB of archive, {from_kafka} from Kafka",
            bytes as f64 / 1048576.0
        );
        if let Some(rate) = rate.filter(|r| *r > 0.0) {
            let secs = self.offsets() as f64 / rate;
            let _ = writeln!(out, "estimated: {secs:.0} s at {rate:.0} events/s");
        }
        out
    }
}

/// The plan for `args` now. `archive` is the opened archive when the source is `archive`.
pub async fn make(
    args: &RecomputeArgs,
    archive: Option<&dyn ObjectStore>,
) -> Result<Plan, RecomputeError> {
    let (kafka_args, topic) = (&args.speed.kafka, &args.speed.topics.events);
    let retained: Retained = kafka::retained(kafka_args, topic)?;
    let partitions = retained.partitions();
    let resume = kafka::committed(kafka_args, &args.group(), topic, &partitions)?;
    let live = kafka::committed(kafka_args, &args.speed.group, topic, &partitions)?;
    let (mut units, mut archived_to): (BTreeMap<i32, Vec<Unit>>, BTreeMap<i32, i64>) =
        Default::default();
    if let (Source::Archive, Some(store)) = (args.source, archive) {
        archived_to = layout::progress(store).await?.into_iter().collect();
        let mut by_range: BTreeMap<FileRange, Vec<ArchiveFile>> = BTreeMap::new();
        for f in layout::committed_files(store, None).await? {
            by_range.entry(f.range).or_default().push(f);
        }
        for (range, files) in by_range {
            units
                .entry(range.partition)
                .or_default()
                .push(Unit { range, files });
        }
    }
    let mut out = Vec::with_capacity(partitions.len());
    for p in partitions {
        let low = retained.low.get(&p).copied().unwrap_or(0);
        let bound = live
            .get(&p)
            .copied()
            .unwrap_or_else(|| retained.high.get(&p).copied().unwrap_or(0));
        let resume = resume.get(&p).copied().unwrap_or(0);
        let mut todo: Vec<Unit> = units
            .remove(&p)
            .unwrap_or_default()
            .into_iter()
            .filter(|u| u.range.last >= resume && u.range.first < bound)
            .collect();
        let mut archive_next = archived_to.get(&p).map(|last| (last + 1).min(bound));
        let starts_late = todo.first().map(|u| u.range.first > resume);
        if starts_late == Some(true) && low <= resume {
            // The archive starts after the recompute's position (the archiver began later)
            // while Kafka still holds that stretch: read the partition from Kafka alone.
            todo.clear();
            archive_next = None;
        }
        let kafka_from = match (starts_late, archive_next) {
            // A head that neither holds: the gap is from `resume` (gap() reports it).
            (Some(true), _) => resume,
            (_, Some(next)) => next.max(resume),
            (_, None) => resume,
        };
        out.push(PartitionPlan {
            partition: p,
            resume,
            units: todo,
            kafka_from,
            bound,
            low,
        });
    }
    Ok(Plan {
        index: args.index.clone(),
        partitions: out,
    })
}
