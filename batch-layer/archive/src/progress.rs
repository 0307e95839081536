//! How far the archive got in each partition, kept in a number of objects that does not grow
//! with the archive's age.
//!
//! ```text
//! _progress/partition=007/00000000000000001899                       {"archived":[[0,1899]]}
//! _pending/partition=007/00000000000000001900-00000000000000002599   ["events/dt=…", …]
//! ```
//!
//! A unit is committed by its marker, named after its last offset. The marker's body says
//! which offsets of the partition the archive accounts for (in files, or as dead letters),
//! as stretches ([`Coverage`]): a new stretch starts where the archiver began after a stretch
//! of offsets it never read (Kafka's retention had dropped them). The highest marker is the
//! truth, and it carries everything the ones before said, so the archiver deletes the older
//! ones; a crash in between leaves more, and the highest wins. It keeps the one before the
//! highest until the next marker: a reader's listing that runs while a marker is written and
//! an older one deleted (a listing is no snapshot: a directory read in hash order, pages of
//! an object listing) then still finds one of the two, never none; and a reader whose
//! marker is deleted between its listing and its read lists again.
//!
//! Before the first file of a unit the archiver writes a pending note naming the unit's
//! files. Files of a unit whose marker never came (a crash, a roll given up) are found from
//! the notes of their partition, so starting a partition lists its markers and notes, never
//! the archive. A note whose range the marker covers is stale (the marker came, the note's
//! deletion did not) and is deleted alone: its paths are the committed unit's.
//!
//! Archives written before this format (2026-12) have an empty marker per unit and no notes.
//! A partition whose highest marker is empty, or that has neither markers nor notes, is read
//! the old way once: its coverage from all its markers and the ranges of its files, its
//! orphans by listing the archive. The next marker written carries the coverage, and the old
//! markers are deleted after it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use crate::layout::{self, FileRange, PENDING_PREFIX, PROGRESS_PREFIX};

/// The offsets of a partition the archive accounts for: sorted, disjoint stretches
/// `(first, last)`, inclusive, with a gap between any two.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    archived: Vec<(i64, i64)>,
}

impl Coverage {
    /// The last archived offset.
    pub fn last(&self) -> Option<i64> {
        self.archived.last().map(|s| s.1)
    }

    pub fn stretches(&self) -> &[(i64, i64)] {
        &self.archived
    }

    /// Adds a unit: it extends the last stretch when it starts right after it (or inside it),
    /// and starts a new one after a gap.
    pub fn add(&mut self, first: i64, last: i64) {
        match self.archived.last_mut() {
            Some(s) if first <= s.1 + 1 => s.1 = s.1.max(last),
            _ => self.archived.push((first, last)),
        }
    }

    /// Every offset of `from..=to` is accounted for (an empty range is).
    pub fn covers(&self, from: i64, to: i64) -> bool {
        from > to || self.archived.iter().any(|&(a, b)| a <= from && to <= b)
    }

    /// The last offset of the stretch that holds `at`.
    pub fn end_of_stretch(&self, at: i64) -> Option<i64> {
        self.archived
            .iter()
            .find(|&&(a, b)| a <= at && at <= b)
            .map(|s| s.1)
    }

    /// The coverage of a partition archived in the old format: a unit ends at each marker and
    /// starts where its files say (`starts`: last → first), or, for a unit of dead letters
    /// only (no file), right after the marker before (at 0 for the first).
    pub fn from_markers(markers: &BTreeSet<i64>, starts: &BTreeMap<i64, i64>) -> Self {
        let mut out = Self::default();
        let mut next = 0;
        for &last in markers {
            out.add(starts.get(&last).copied().unwrap_or(next), last);
            next = last + 1;
        }
        out
    }
}

/// The body of a marker.
#[derive(Debug, Serialize, Deserialize)]
struct MarkerBody {
    archived: Vec<(i64, i64)>,
}

/// The pending note of a unit: its range and the files it is about to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingNote {
    pub path: Path,
    pub range: FileRange,
}

pub fn marker_path(partition: i32, last: i64) -> Path {
    Path::from(format!(
        "{PROGRESS_PREFIX}/partition={partition:03}/{last:020}"
    ))
}

pub fn note_path(range: FileRange) -> Path {
    Path::from(format!(
        "{PENDING_PREFIX}/partition={:03}/{:020}-{:020}",
        range.partition, range.first, range.last
    ))
}

fn parse_note(partition: i32, path: &Path) -> Option<FileRange> {
    let (first, last) = path.filename()?.split_once('-')?;
    Some(FileRange {
        partition,
        first: first.parse().ok()?,
        last: last.parse().ok()?,
    })
}

/// The marker body after `coverage`.
pub fn marker_body(coverage: &Coverage) -> Vec<u8> {
    // A Vec of integer pairs always serialises.
    serde_json::to_vec(&MarkerBody {
        archived: coverage.archived.clone(),
    })
    .unwrap_or_default()
}

/// The note's body: the paths of the unit's files.
pub fn note_body(paths: &[Path]) -> Vec<u8> {
    let paths: Vec<&str> = paths.iter().map(|p| p.as_ref()).collect();
    serde_json::to_vec(&paths).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("{path}: not a progress marker or pending note of this format: {error}")]
    Corrupt { path: String, error: String },
}

/// One partition's progress as the object store holds it, and what is left to tidy.
#[derive(Debug, Clone, Default)]
pub struct PartitionProgress {
    pub partition: i32,
    pub coverage: Coverage,
    /// Every marker found, by last offset.
    pub markers: BTreeMap<i64, Path>,
    /// The highest marker was written in the old format (empty), or there is none and no
    /// note either (a partition never archived, which an old archiver may have left files
    /// of): coverage and orphans came from listing the archive.
    pub legacy: bool,
    /// Files of units whose marker never came (their notes', or found by the old listing).
    pub orphans: Vec<Path>,
    /// Every note found: the unfinished ones (their files are `orphans`) and stale ones.
    pub notes: Vec<PendingNote>,
    /// Objects listed (and bodies read) to find all this: a start-up's cost.
    pub objects_read: u64,
}

impl PartitionProgress {
    /// The last archived offset.
    pub fn last(&self) -> Option<i64> {
        self.coverage.last()
    }

    /// Markers below the two highest (the highest carries what they said; the one before it
    /// stays for readers listing meanwhile); only when the highest is in this format (the
    /// old markers are the coverage until a new marker is written).
    pub fn superseded(&self) -> Vec<Path> {
        match self.legacy {
            true => Vec::new(),
            false => self
                .markers
                .iter()
                .rev()
                .skip(MARKERS_KEPT)
                .map(|(_, p)| p.clone())
                .collect(),
        }
    }
}

/// Markers a partition keeps: the highest, and the one before it for readers listing while
/// the next is written.
pub const MARKERS_KEPT: usize = 2;

/// How often a reader lists again when the marker it listed was deleted before it read it.
const RELISTS: usize = 5;

/// Reads partition `partition`'s progress: its markers and notes, and the files of its
/// unfinished units; in the old format, the coverage and orphans from the archive's listing.
pub async fn read(
    store: &dyn ObjectStore,
    partition: i32,
) -> Result<PartitionProgress, ProgressError> {
    let mut tries = 0;
    loop {
        match read_once(store, partition).await {
            Err(ProgressError::Store(object_store::Error::NotFound { .. })) if tries < RELISTS => {
                tries += 1;
            }
            other => return other,
        }
    }
}

async fn read_once(
    store: &dyn ObjectStore,
    partition: i32,
) -> Result<PartitionProgress, ProgressError> {
    let mut out = PartitionProgress {
        partition,
        ..Default::default()
    };
    let mut list = store.list(Some(&partition_dir(PROGRESS_PREFIX, partition)));
    while let Some(meta) = list.try_next().await? {
        out.objects_read += 1;
        if let Some((_, last)) = layout::parse_marker(&meta.location) {
            out.markers.insert(last, meta.location);
        }
    }
    let mut list = store.list(Some(&partition_dir(PENDING_PREFIX, partition)));
    while let Some(meta) = list.try_next().await? {
        out.objects_read += 1;
        if let Some(range) = parse_note(partition, &meta.location) {
            out.notes.push(PendingNote {
                path: meta.location,
                range,
            });
        }
    }
    let newest = match out.markers.last_key_value() {
        Some((_, path)) => Some(read_marker(store, path).await?),
        None => None,
    };
    out.objects_read += u64::from(newest.is_some());
    match newest {
        Some(Some(coverage)) => out.coverage = coverage,
        None if !out.notes.is_empty() => {}
        // The old format, or a partition never archived that an old archiver may have left
        // files of: read the archive once.
        _ => {
            out.legacy = true;
            let files = listed_ranges(store, &mut out.objects_read).await?;
            let markers: BTreeSet<i64> = out.markers.keys().copied().collect();
            let mine = files.into_iter().filter(|(_, r)| r.partition == partition);
            let (mut starts, mut beyond) = (BTreeMap::new(), Vec::new());
            let done = markers.last().copied();
            for (path, range) in mine {
                match done.is_some_and(|d| range.last <= d) {
                    true => {
                        starts.insert(range.last, range.first);
                    }
                    false => beyond.push(path),
                }
            }
            out.coverage = Coverage::from_markers(&markers, &starts);
            out.orphans = beyond;
        }
    }
    let last = out.last();
    for note in &out.notes {
        if last.is_none_or(|l| note.range.last > l) {
            out.objects_read += 1;
            out.orphans.extend(read_note(store, &note.path).await?);
        }
    }
    Ok(out)
}

/// Deletes the files of `progress`'s unfinished units, then every note, then the superseded
/// markers: what a partition's new owner does before it archives a range again. Files go
/// first, so that a failure leaves their note to find them again.
pub async fn tidy(
    store: &dyn ObjectStore,
    progress: &PartitionProgress,
) -> Result<(), ProgressError> {
    delete_all(store, progress.orphans.clone()).await?;
    delete_all(
        store,
        progress.notes.iter().map(|n| n.path.clone()).collect(),
    )
    .await?;
    delete_all(store, progress.superseded()).await?;
    Ok(())
}

/// Deletes `paths`; one already gone counts as deleted.
pub async fn delete_all(store: &dyn ObjectStore, paths: Vec<Path>) -> object_store::Result<()> {
    if paths.is_empty() {
        return Ok(());
    }
    let stream = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
    let mut deleted = store.delete_stream(stream);
    while let Some(result) = deleted.next().await {
        match result {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Every partition's coverage, for readers that plan over the whole archive (recompute):
/// one listing of the markers, the highest marker of each partition read, and, if any
/// partition is in the old format, one listing of the archive.
pub async fn coverage_all(
    store: &dyn ObjectStore,
) -> Result<HashMap<i32, Coverage>, ProgressError> {
    let mut tries = 0;
    loop {
        match coverage_all_once(store).await {
            Err(ProgressError::Store(object_store::Error::NotFound { .. })) if tries < RELISTS => {
                tries += 1;
            }
            other => return other,
        }
    }
}

async fn coverage_all_once(
    store: &dyn ObjectStore,
) -> Result<HashMap<i32, Coverage>, ProgressError> {
    let mut newest: BTreeMap<i32, (i64, Path)> = BTreeMap::new();
    let mut all: HashMap<i32, BTreeSet<i64>> = HashMap::new();
    let mut list = store.list(Some(&Path::from(PROGRESS_PREFIX)));
    while let Some(meta) = list.try_next().await? {
        let Some((p, last)) = layout::parse_marker(&meta.location) else {
            continue;
        };
        all.entry(p).or_default().insert(last);
        if newest.get(&p).is_none_or(|(l, _)| last > *l) {
            newest.insert(p, (last, meta.location));
        }
    }
    let read: Vec<(i32, Option<Coverage>)> = futures::stream::iter(newest)
        .map(|(p, (_, path))| async move {
            Ok::<_, ProgressError>((p, read_marker(store, &path).await?))
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    let mut out = HashMap::new();
    let mut legacy = Vec::new();
    for (p, coverage) in read {
        match coverage {
            Some(c) => {
                out.insert(p, c);
            }
            None => legacy.push(p),
        }
    }
    if !legacy.is_empty() {
        let mut starts: HashMap<i32, BTreeMap<i64, i64>> = HashMap::new();
        for (_, r) in listed_ranges(store, &mut 0).await? {
            starts
                .entry(r.partition)
                .or_default()
                .insert(r.last, r.first);
        }
        for p in legacy {
            let markers = all.remove(&p).unwrap_or_default();
            let starts = starts.remove(&p).unwrap_or_default();
            out.insert(p, Coverage::from_markers(&markers, &starts));
        }
    }
    Ok(out)
}

fn partition_dir(prefix: &str, partition: i32) -> Path {
    Path::from(format!("{prefix}/partition={partition:03}"))
}

/// A marker's coverage; `None` for an empty (old-format) marker.
async fn read_marker(
    store: &dyn ObjectStore,
    path: &Path,
) -> Result<Option<Coverage>, ProgressError> {
    let bytes = store.get(path).await?.bytes().await?;
    if bytes.is_empty() {
        return Ok(None);
    }
    let body: MarkerBody = serde_json::from_slice(&bytes).map_err(|e| ProgressError::Corrupt {
        path: path.to_string(),
        error: e.to_string(),
    })?;
    Ok(Some(Coverage {
        archived: body.archived,
    }))
}

/// The paths a note names.
async fn read_note(store: &dyn ObjectStore, path: &Path) -> Result<Vec<Path>, ProgressError> {
    let bytes = match store.get(path).await {
        Ok(got) => got.bytes().await?,
        // Deleted meanwhile by a tidy of its own (a second member): nothing to clean.
        Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let paths: Vec<String> =
        serde_json::from_slice(&bytes).map_err(|e| ProgressError::Corrupt {
            path: path.to_string(),
            error: e.to_string(),
        })?;
    Ok(paths.into_iter().map(Path::from).collect())
}

/// Every data and identity file's path and range, listed (the old format's way).
async fn listed_ranges(
    store: &dyn ObjectStore,
    listed: &mut u64,
) -> object_store::Result<Vec<(Path, FileRange)>> {
    let mut out = Vec::new();
    for f in layout::all_files(store, None).await? {
        out.push((f.path, f.range));
    }
    for f in layout::all_identity_files(store, None).await? {
        out.push((f.path, f.range));
    }
    *listed += out.len() as u64;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_in_a_row_make_one_stretch_and_a_skipped_range_starts_another() {
        let mut c = Coverage::default();
        c.add(0, 99);
        c.add(100, 199);
        c.add(500, 599);
        assert_eq!(c.stretches(), &[(0, 199), (500, 599)]);
        assert_eq!(c.last(), Some(599));
        assert!(c.covers(50, 150));
        assert!(
            !c.covers(150, 550),
            "the gap 200..=499 is not accounted for"
        );
        assert!(c.covers(300, 299), "an empty range is");
        assert_eq!(c.end_of_stretch(120), Some(199));
        assert_eq!(c.end_of_stretch(300), None);
    }

    #[test]
    fn old_markers_become_stretches_from_the_files_that_name_unit_starts() {
        let markers: BTreeSet<i64> = [99, 199, 299, 599].into();
        // 100..=199 had no file (dead letters only); 500..=599 started late.
        let starts: BTreeMap<i64, i64> = [(99, 0), (299, 200), (599, 500)].into();
        let c = Coverage::from_markers(&markers, &starts);
        assert_eq!(c.stretches(), &[(0, 299), (500, 599)]);
    }

    #[test]
    fn marker_and_note_names_round_trip() {
        let r = FileRange {
            partition: 7,
            first: 1900,
            last: 2599,
        };
        let note = note_path(r);
        assert_eq!(
            note.as_ref(),
            "_pending/partition=007/00000000000000001900-00000000000000002599"
        );
        assert_eq!(parse_note(7, &note), Some(r));
        let marker = marker_path(7, 1899);
        assert_eq!(layout::parse_marker(&marker), Some((7, 1899)));
        let mut c = Coverage::default();
        c.add(0, 1899);
        let body: MarkerBody = serde_json::from_slice(&marker_body(&c)).unwrap();
        assert_eq!(body.archived, vec![(0, 1899)]);
    }
}
