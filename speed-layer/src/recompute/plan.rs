//! What a recompute will read, per partition: the archive's units from where the recompute
//! stands (its own group's commit) up to the live layer's commit, then Kafka from the archive's
//! end to the same bound. A partition whose next offset Kafka no longer holds and the archive
//! does not cover is a gap: the plan names it and `run` refuses, since folding on would
//! silently drop that history.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use object_store::ObjectStore;
use pulse_archive::layout::{self, ArchiveFile, FileRange};
use pulse_archive::progress::{self, Coverage};

use super::kafka::{self, Retained};
use super::{RecomputeArgs, RecomputeError, Source};
use crate::store::ProfileStore;

/// One archived offset range of a partition, with the files it wrote.
#[derive(Debug, Clone)]
pub struct Unit {
    pub range: FileRange,
    /// Its events, one file per event date.
    pub files: Vec<ArchiveFile>,
    /// The speed layer's identity records among them, one file per date they were written
    /// (a unit may hold only these).
    pub identity_files: Vec<ArchiveFile>,
}

impl Unit {
    /// Every file of the unit, events first.
    pub fn all_files(&self) -> impl Iterator<Item = &ArchiveFile> {
        self.files.iter().chain(&self.identity_files)
    }
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
            .flat_map(Unit::all_files)
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
             Recomputing would silently lose it; restore the archive of these ranges, or \
             accept the loss with --source kafka (from the earliest offset Kafka holds) into \
             a new index",
            list.join(", ")
        )))
    }

    /// The plan as a table, with the time it takes at the reference rates, or at
    /// `max_rate` events/s where that is lower (`--max-events-per-sec`).
    pub fn render(&self, max_rate: Option<f64>) -> String {
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
        let cap = max_rate.filter(|r| *r > 0.0).unwrap_or(f64::INFINITY);
        let (a, k) = (
            REFERENCE_RATE_ARCHIVE.min(cap),
            REFERENCE_RATE_KAFKA.min(cap),
        );
        let secs = archived.max(0) as f64 / a + from_kafka.max(0) as f64 / k;
        let _ = writeln!(
            out,
            "estimated: {secs:.0} s (the archive at {a:.0} events/s, Kafka at {k:.0}: {})",
            if cap.is_finite() {
                "capped by --max-events-per-sec"
            } else {
                "bench/recompute's rates on 2 cores; more distinct users take longer"
            }
        );
        out
    }
}

/// Events per second of a recompute from the archive, and from Kafka, as `bench/recompute`
/// measured them on a 2-core machine (release build, Elasticsearch on the same cores, 22,375
/// users in 500,000 events): what the plan's estimate assumes. A guide, not a promise: a
/// document is written per distinct user, so the time follows the users more than the
/// events.
pub const REFERENCE_RATE_ARCHIVE: f64 = 300_000.0;
pub const REFERENCE_RATE_KAFKA: f64 = 180_000.0;

/// The archive `args` reads, if its source is the archive.
pub fn open_archive(args: &RecomputeArgs) -> Result<Option<Arc<dyn ObjectStore>>, RecomputeError> {
    Ok(match args.source {
        Source::Archive => Some(pulse_archive::store::open_store(&args.archive)?),
        Source::Kafka => None,
    })
}

/// The plan a `run` would follow now (the `plan` command: nothing is created).
pub async fn preview(args: &RecomputeArgs) -> Result<Plan, RecomputeError> {
    let live = ProfileStore::new(&args.speed.es)?;
    let fresh = !super::indices::exists(&live, &args.index).await?;
    make(args, open_archive(args)?.as_deref(), fresh).await
}

/// The plan for `args` now. `archive` is the opened archive when the source is `archive`;
/// `fresh`: the index is new, so the recompute's group commits (of an index deleted since)
/// are not its progress.
pub async fn make(
    args: &RecomputeArgs,
    archive: Option<&dyn ObjectStore>,
    fresh: bool,
) -> Result<Plan, RecomputeError> {
    let (kafka_args, topic) = (&args.speed.kafka, &args.speed.topics.events);
    let retained: Retained = kafka::retained(kafka_args, topic)?;
    let partitions = retained.partitions();
    let resume = match fresh {
        true => BTreeMap::new(),
        false => kafka::committed(kafka_args, &args.group(), topic, &partitions)?,
    };
    let live = kafka::committed(kafka_args, &args.speed.group, topic, &partitions)?;
    let (mut units, mut coverage): (BTreeMap<i32, Vec<Unit>>, HashMap<i32, Coverage>) =
        Default::default();
    if let (Source::Archive, Some(store)) = (args.source, archive) {
        coverage = progress::coverage_all(store).await?;
        let mut by_range: BTreeMap<FileRange, Unit> = BTreeMap::new();
        let unit = |range| Unit {
            range,
            files: Vec::new(),
            identity_files: Vec::new(),
        };
        for f in layout::committed_files(store, None).await? {
            by_range
                .entry(f.range)
                .or_insert_with(|| unit(f.range))
                .files
                .push(f);
        }
        for f in layout::committed_identity_files(store, None).await? {
            let entry = by_range.entry(f.range).or_insert_with(|| unit(f.range));
            entry.identity_files.push(f);
        }
        for (range, unit) in by_range {
            units.entry(range.partition).or_default().push(unit);
        }
    }
    let mut out = Vec::with_capacity(partitions.len());
    for p in partitions {
        let low = retained.low.get(&p).copied().unwrap_or(0);
        let high = retained.high.get(&p).copied().unwrap_or(0);
        // A partition the live group never committed is read by the live layer from the
        // earliest offset Kafka holds (auto.offset.reset): the recompute stops there. And
        // never beyond what Kafka has.
        let bound = live.get(&p).copied().unwrap_or(low).min(high);
        // Without progress: the archive starts at the beginning of the partition; Kafka
        // alone at the earliest offset it holds (what it no longer holds is not folded).
        let start = match args.source {
            Source::Archive => 0,
            Source::Kafka => low,
        };
        let resume = resume.get(&p).copied().unwrap_or(start);
        let candidates = units.remove(&p).unwrap_or_default();
        let (todo, archive_next) = usable_units(candidates, coverage.get(&p), resume, bound);
        out.push(PartitionPlan {
            partition: p,
            resume,
            units: todo,
            kafka_from: archive_next.min(bound).max(resume),
            bound,
            low,
        });
    }
    Ok(Plan {
        index: args.index.clone(),
        partitions: out,
    })
}

/// The units to fold from `resume` (below `bound`), in order, up to the first stretch of
/// offsets the archive does not account for, and the offset after what they cover.
///
/// Between two units, or before the first, offsets without a file are accounted for only by
/// the partition's coverage (see `pulse_archive::progress`): inside a stretch they held units
/// of dead-lettered records only. Offsets outside every stretch are a hole in the archive (an
/// archiver that started late): the archive is used up to it and Kafka from there, and if
/// Kafka no longer holds it the plan reports a gap. (Every file of a unit deleted under its
/// marker looks like a dead-letter-only unit; markers do not count rows.)
fn usable_units(
    candidates: Vec<Unit>,
    coverage: Option<&Coverage>,
    resume: i64,
    bound: i64,
) -> (Vec<Unit>, i64) {
    let none = Coverage::default();
    let coverage = coverage.unwrap_or(&none);
    let mut next = resume;
    let mut todo = Vec::new();
    for unit in candidates
        .into_iter()
        .filter(|u| u.range.last >= resume && u.range.first < bound)
    {
        if !coverage.covers(next, unit.range.first - 1) {
            // A hole: the archive is used up to here, even where later stretches exist.
            return (todo, next);
        }
        next = next.max(unit.range.last + 1);
        todo.push(unit);
    }
    // Every file is used: the rest of the stretch holds dead-letter-only units.
    if let Some(end) = coverage.end_of_stretch(next) {
        next = end + 1;
    }
    (todo, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(first: i64, last: i64) -> Unit {
        Unit {
            range: FileRange {
                partition: 0,
                first,
                last,
            },
            files: Vec::new(),
            identity_files: Vec::new(),
        }
    }

    /// The coverage of old-format markers and the unit starts their files name.
    fn covering(markers: &[i64], starts: &[(i64, i64)]) -> Coverage {
        let markers = markers.iter().copied().collect();
        let starts = starts.iter().copied().collect();
        Coverage::from_markers(&markers, &starts)
    }

    fn firsts(units: &[Unit]) -> Vec<i64> {
        units.iter().map(|u| u.range.first).collect()
    }

    #[test]
    fn contiguous_units_are_used_to_the_last_marker() {
        let markers = covering(&[99, 199, 299], &[(99, 0), (199, 100)]);
        let (todo, next) = usable_units(vec![unit(0, 99), unit(100, 199)], Some(&markers), 0, 1000);
        // 200..=299 held dead letters only: covered, Kafka starts after it.
        assert_eq!((firsts(&todo), next), (vec![0, 100], 300));
    }

    #[test]
    fn a_hole_no_marker_accounts_for_ends_the_archive_there() {
        let markers = covering(&[99, 299], &[(99, 0), (299, 250)]);
        let (todo, next) = usable_units(vec![unit(0, 99), unit(250, 299)], Some(&markers), 0, 1000);
        assert_eq!((firsts(&todo), next), (vec![0], 100));
    }

    #[test]
    fn an_archive_that_starts_late_is_not_used_from_the_start() {
        let markers = covering(&[599], &[(599, 500)]);
        let (todo, next) = usable_units(vec![unit(500, 599)], Some(&markers), 0, 1000);
        assert_eq!((firsts(&todo), next), (vec![], 0));
    }

    #[test]
    fn a_resumed_run_takes_the_unit_it_stopped_in_and_stops_at_the_bound() {
        let markers = covering(&[99, 199, 299], &[(99, 0), (199, 100), (299, 200)]);
        let units = vec![unit(0, 99), unit(100, 199), unit(200, 299)];
        let (todo, next) = usable_units(units, Some(&markers), 150, 220);
        assert_eq!(firsts(&todo), vec![100, 200]);
        assert_eq!(next, 300, "min(bound) is applied by the caller");
    }

    #[test]
    fn a_plan_that_needs_offsets_kafka_dropped_names_them() {
        let p = PartitionPlan {
            partition: 3,
            resume: 0,
            units: Vec::new(),
            kafka_from: 0,
            bound: 500,
            low: 200,
        };
        assert_eq!(p.gap(), Some((0, 199)));
        let plan = Plan {
            index: "profiles-v2".into(),
            partitions: vec![p],
        };
        let refused = plan.check().unwrap_err().to_string();
        assert!(refused.contains("partition 3 offsets 0..=199"), "{refused}");
    }

    #[test]
    fn the_estimate_takes_each_source_at_its_rate_and_the_cap_where_lower() {
        let p = PartitionPlan {
            partition: 0,
            resume: 0,
            units: vec![unit(0, 2_999_999)],
            kafka_from: 3_000_000,
            bound: 3_900_000,
            low: 0,
        };
        let plan = Plan {
            index: "profiles-v2".into(),
            partitions: vec![p],
        };
        // 3,000,000 at 300,000/s and 900,000 at 180,000/s.
        let free = plan.render(None);
        assert!(free.contains("estimated: 15 s"), "{free}");
        assert!(free.contains("bench/recompute"), "{free}");
        // Both capped at 100,000/s: 39 s.
        let capped = plan.render(Some(100_000.0));
        assert!(capped.contains("estimated: 39 s"), "{capped}");
        assert!(capped.contains("--max-events-per-sec"), "{capped}");
    }
}
