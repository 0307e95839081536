//! Where archived events live in the object store, and which files count.
//!
//! ```text
//! events/dt=2026-11-21/part-007-00000000000000001200-00000000000000001899.parquet
//! identities/dt=2026-11-21/part-007-00000000000000001200-00000000000000001899.parquet
//! _progress/partition=007/00000000000000001899
//! ```
//!
//! The archiver reads partition 7 from offset 1200 to 1899 (one "unit"), writes one file per
//! event date found in that range, all named after the range, and then the progress marker.
//! The speed layer's identity records of the range (see `identity_file`) go beside them, under
//! `identities/`, by the day they were written, named the same way. A unit is committed once
//! its marker exists: the object store, not Kafka, says how far the archive got. A file beyond
//! its partition's highest marker (a crash between the files and the marker) is not committed:
//! readers ignore it, and the archiver deletes it before it reads the range again. How the
//! markers stay few, and how the archiver finds those files without listing the archive, is
//! [`crate::progress`].

use std::collections::{BTreeSet, HashMap};

use chrono::NaiveDate;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::ObjectStore;

pub const DATA_PREFIX: &str = "events";
pub const IDENTITY_PREFIX: &str = "identities";
pub const PROGRESS_PREFIX: &str = "_progress";
/// Notes of units being written (see [`crate::progress`]); no reader lists them.
pub const PENDING_PREFIX: &str = "_pending";

/// A data file's partition and offset range, parsed from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileRange {
    pub partition: i32,
    pub first: i64,
    pub last: i64,
}

pub fn data_path(dt: NaiveDate, range: FileRange) -> Path {
    path_under(DATA_PREFIX, dt, range)
}

/// The identity records of a unit written on day `dt`.
pub fn identity_path(dt: NaiveDate, range: FileRange) -> Path {
    path_under(IDENTITY_PREFIX, dt, range)
}

fn path_under(prefix: &str, dt: NaiveDate, range: FileRange) -> Path {
    Path::from(format!(
        "{prefix}/dt={dt}/part-{:03}-{:020}-{:020}.parquet",
        range.partition, range.first, range.last
    ))
}

/// (partition, last offset) of a marker path, or None for anything else.
pub fn parse_marker(path: &Path) -> Option<(i32, i64)> {
    let rest = path
        .as_ref()
        .strip_prefix(PROGRESS_PREFIX)?
        .strip_prefix("/partition=")?;
    let (p, last) = rest.split_once('/')?;
    Some((p.parse().ok()?, last.parse().ok()?))
}

/// (dt, range) of a data file path, or None for anything else.
pub fn parse_data_path(path: &Path) -> Option<(NaiveDate, FileRange)> {
    parse_under(DATA_PREFIX, path)
}

fn parse_under(prefix: &str, path: &Path) -> Option<(NaiveDate, FileRange)> {
    let text = path.as_ref();
    let rest = text.strip_prefix(prefix)?.strip_prefix("/dt=")?;
    let (dt, file) = rest.split_once('/')?;
    let dt = NaiveDate::parse_from_str(dt, "%Y-%m-%d").ok()?;
    let stem = file.strip_prefix("part-")?.strip_suffix(".parquet")?;
    let mut parts = stem.split('-');
    let range = FileRange {
        partition: parts.next()?.parse().ok()?,
        first: parts.next()?.parse().ok()?,
        last: parts.next()?.parse().ok()?,
    };
    parts.next().is_none().then_some((dt, range))
}

/// Partition → last archived offset, from the markers.
pub async fn progress(store: &dyn ObjectStore) -> object_store::Result<HashMap<i32, i64>> {
    Ok(markers(store)
        .await?
        .into_iter()
        .filter_map(|(p, lasts)| Some((p, *lasts.last()?)))
        .collect())
}

/// Partition → the last offset of every marker: the highest is how far the partition got
/// (see [`crate::progress`] for what the others are).
pub async fn markers(store: &dyn ObjectStore) -> object_store::Result<HashMap<i32, BTreeSet<i64>>> {
    let mut out: HashMap<i32, BTreeSet<i64>> = HashMap::new();
    let prefix = Path::from(PROGRESS_PREFIX);
    let mut list = store.list(Some(&prefix));
    while let Some(meta) = list.try_next().await? {
        if let Some((p, last)) = parse_marker(&meta.location) {
            out.entry(p).or_default().insert(last);
        }
    }
    Ok(out)
}

/// A data file of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveFile {
    pub path: Path,
    /// The UTC day of its events.
    pub dt: NaiveDate,
    pub range: FileRange,
    /// Bytes in the object store.
    pub size: u64,
}

/// Every data file, committed or not, optionally of one day, by day then range.
pub async fn all_files(
    store: &dyn ObjectStore,
    dt: Option<NaiveDate>,
) -> object_store::Result<Vec<ArchiveFile>> {
    all_files_under(store, DATA_PREFIX, dt).await
}

/// Every identity file, committed or not, optionally of one day, by day then range.
pub async fn all_identity_files(
    store: &dyn ObjectStore,
    dt: Option<NaiveDate>,
) -> object_store::Result<Vec<ArchiveFile>> {
    all_files_under(store, IDENTITY_PREFIX, dt).await
}

async fn all_files_under(
    store: &dyn ObjectStore,
    under: &str,
    dt: Option<NaiveDate>,
) -> object_store::Result<Vec<ArchiveFile>> {
    let prefix = match dt {
        Some(d) => Path::from(format!("{under}/dt={d}")),
        None => Path::from(under),
    };
    let mut out = Vec::new();
    let mut list = store.list(Some(&prefix));
    while let Some(meta) = list.try_next().await? {
        if let Some((dt, range)) = parse_under(under, &meta.location) {
            out.push(ArchiveFile {
                path: meta.location,
                dt,
                range,
                size: meta.size,
            });
        }
    }
    out.sort_by_key(|f| (f.dt, f.range));
    Ok(out)
}

/// The committed data files (covered by a progress marker), optionally of one day. What
/// readers (SQL, warehouse loads) must use.
pub async fn committed_files(
    store: &dyn ObjectStore,
    dt: Option<NaiveDate>,
) -> object_store::Result<Vec<ArchiveFile>> {
    committed(store, all_files(store, dt).await?).await
}

/// The committed identity files, optionally of one day.
pub async fn committed_identity_files(
    store: &dyn ObjectStore,
    dt: Option<NaiveDate>,
) -> object_store::Result<Vec<ArchiveFile>> {
    committed(store, all_identity_files(store, dt).await?).await
}

/// Those of `files` a progress marker covers.
async fn committed(
    store: &dyn ObjectStore,
    files: Vec<ArchiveFile>,
) -> object_store::Result<Vec<ArchiveFile>> {
    let done = progress(store).await?;
    Ok(files
        .into_iter()
        .filter(|f| {
            done.get(&f.range.partition)
                .is_some_and(|last| f.range.last <= *last)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let dt = NaiveDate::from_ymd_opt(2026, 11, 21).unwrap();
        let r = FileRange {
            partition: 7,
            first: 1200,
            last: 1899,
        };
        let p = data_path(dt, r);
        assert_eq!(
            p.as_ref(),
            "events/dt=2026-11-21/part-007-00000000000000001200-00000000000000001899.parquet"
        );
        assert_eq!(parse_data_path(&p), Some((dt, r)));
        assert_eq!(
            parse_data_path(&Path::from("events/dt=2026-11-21/other.parquet")),
            None
        );
        let i = identity_path(dt, r);
        assert_eq!(
            i.as_ref(),
            "identities/dt=2026-11-21/part-007-00000000000000001200-00000000000000001899.parquet"
        );
        assert_eq!(parse_under(IDENTITY_PREFIX, &i), Some((dt, r)));
        assert_eq!(
            parse_data_path(&i),
            None,
            "an identity file is no data file"
        );
        assert_eq!(
            parse_marker(&Path::from("_progress/partition=007/00000000000000001899")),
            Some((7, 1899))
        );
        assert_eq!(parse_marker(&i), None);
    }
}
