//! An archive file without the rows of erased people (`pulse_core::erasure`).
//!
//! The file keeps its name, so the archive's exactly-once bookkeeping is untouched: a file is
//! still named after its unit's offset range and covered by the unit's progress marker (a
//! range never promised a row per offset: dead-lettered records have none either). The other
//! rows are filtered as Arrow arrays and written back as they were read, value for value, with
//! the file's own codec. The new file replaces the old one with one `put`, which the object
//! stores make atomic (a local file is written aside and renamed; an S3 or GCS object is
//! replaced whole): a reader, or a crash, sees the old file or the new one, never half.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, StringArray};
use arrow::compute::filter_record_batch;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use chrono::NaiveDate;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use pulse_core::erasure::Erasures;
use pulse_core::event::partition_key;
use pulse_core::partitioner::partition_of;

use crate::bloom::{self, Probe};
use crate::layout::{self, ArchiveFile};
use crate::parquet_file::{writer_properties, ParquetError};

/// What a file holds: events (`events/`) or identity records (`identities/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A row is the person's when its person id (`user_id`, else `anonymous_id`) is erased,
    /// as `Erasures::erases` has it for an event.
    Events,
    /// A row is the person's when its device or its person is erased.
    Identities,
}

/// A file's rows, before and after.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filtered {
    pub rows: usize,
    pub removed: usize,
}

/// `bytes` (a file of `kind`) without the rows `erasures` names, or `None` when it has none
/// of them (the file is left as it is). Only the id columns are decoded to find out.
pub fn without(
    bytes: Bytes,
    kind: FileKind,
    erasures: &Erasures,
) -> Result<(Filtered, Option<Vec<u8>>), ParquetError> {
    let filtered = count(bytes.clone(), kind, erasures)?;
    if filtered.removed == 0 {
        return Ok((filtered, None));
    }
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let compression = builder
        .metadata()
        .row_groups()
        .first()
        .filter(|rg| rg.num_columns() > 0)
        .map_or(Compression::UNCOMPRESSED, |rg| rg.column(0).compression());
    let schema = builder.schema().clone();
    let rows = usize::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
    let mut out = Vec::new();
    let props = writer_properties(compression, rows);
    let mut writer = ArrowWriter::try_new(&mut out, schema, Some(props))?;
    for batch in builder.build()? {
        let batch = batch?;
        let keep = keep_mask(&batch, kind, erasures)?;
        writer.write(&filter_record_batch(&batch, &keep)?)?;
    }
    writer.close()?;
    Ok((filtered, Some(out)))
}

/// How many rows the file has and how many `erasures` names, reading the id columns only.
pub fn count(bytes: Bytes, kind: FileKind, erasures: &Erasures) -> Result<Filtered, ParquetError> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let wanted = ["partner_id", "user_id", "anonymous_id"];
    let schema = builder.parquet_schema();
    let indices: Vec<usize> = (0..schema.num_columns())
        .filter(|&i| wanted.contains(&schema.column(i).name()))
        .collect();
    if indices.len() != wanted.len() {
        return Err(ParquetError::Schema(format!(
            "an archive file needs the columns {wanted:?}"
        )));
    }
    let mask = parquet::arrow::ProjectionMask::roots(schema, indices);
    let mut out = Filtered::default();
    for batch in builder.with_projection(mask).build()? {
        let batch = batch?;
        let keep = keep_mask(&batch, kind, erasures)?;
        out.rows += batch.num_rows();
        out.removed += keep.iter().filter(|k| *k == Some(false)).count();
    }
    Ok(out)
}

/// What erasing from the archive did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Rewritten {
    /// Files of the erased people's partitions whose bloom filters ruled them out: only
    /// their footers and filters were read ([`crate::bloom`]).
    pub files_passed_over: u64,
    /// The bytes those probes read (footers and filters).
    pub probe_bytes_read: u64,
    /// Files read whole (their filters did not rule the people out, or they have none).
    pub files_scanned: u64,
    pub files_rewritten: u64,
    pub rows_removed: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// The days (`dt=`) of the event files that held rows of the erased: the warehouse days
    /// to delete from.
    pub days: BTreeSet<NaiveDate>,
}

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// A file that cannot be read as an archive file: named, never passed over (it may hold
    /// the person's rows).
    #[error("{path}: {error}")]
    File { path: String, error: ParquetError },
    /// The caller's journal could not record what it must keep before a file is replaced.
    #[error("recording before a rewrite: {0}")]
    Journal(String),
}

/// What the caller of [`rewrite`] is told as it goes.
pub trait RewriteJournal {
    /// Called before an event file of `day` is replaced without the erased's rows: what the
    /// caller needs to finish after a crash (the warehouse days to delete from, which the
    /// rewritten file no longer shows) is saved here, before the old file is gone.
    fn before_replace(
        &mut self,
        day: NaiveDate,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
    /// The totals after each file.
    fn progress(&mut self, so_far: &Rewritten);
}

/// Rewrites every committed file (events and identities) of the erased ids' partitions (of
/// `partition_count`, as the events topic keys them) that holds rows of `erasures`, without
/// them; with `dry_run`, only counts. Each file is probed first, and read only when its bloom
/// filters do not rule the ids out: an events file for the ids of its own partition (a row is
/// keyed by its person id, the id it is matched by), an identity file for every id (a record
/// sits in its device's partition and may name a person of another). `journal` is told of each
/// event file's day before the file is replaced, and sees the totals after each file. Only
/// committed files are touched: a file beyond its partition's marker belongs to the archiver
/// (which deletes it before it writes the range again, filtering erased rows itself).
pub async fn rewrite(
    store: &Arc<dyn ObjectStore>,
    erasures: &Erasures,
    partition_count: i32,
    dry_run: bool,
    journal: &mut impl RewriteJournal,
) -> Result<Rewritten, RewriteError> {
    let mut by_partition: BTreeMap<i32, Vec<&str>> = BTreeMap::new();
    let mut every_id: Vec<&str> = Vec::new();
    for (partner, ids) in erasures.by_partner() {
        for id in ids {
            let key = partition_key(partner, id);
            let partition = partition_of(key.as_bytes(), partition_count);
            by_partition.entry(partition).or_default().push(id);
            every_id.push(id);
        }
    }
    let mut files: Vec<(ArchiveFile, FileKind)> = Vec::new();
    let in_scope = |f: &ArchiveFile| by_partition.contains_key(&f.range.partition);
    for f in layout::committed_files(store.as_ref(), None).await? {
        if in_scope(&f) {
            files.push((f, FileKind::Events));
        }
    }
    for f in layout::committed_identity_files(store.as_ref(), None).await? {
        if in_scope(&f) {
            files.push((f, FileKind::Identities));
        }
    }
    let mut out = Rewritten::default();
    for (file, kind) in files {
        let failed = |error| RewriteError::File {
            path: file.path.to_string(),
            error,
        };
        let ids = match kind {
            FileKind::Events => &by_partition[&file.range.partition],
            FileKind::Identities => &every_id,
        };
        let probed = bloom::probe(store.clone(), &file, ids)
            .await
            .map_err(failed)?;
        if let Probe::Clear { bytes_read } = probed {
            out.files_passed_over += 1;
            out.probe_bytes_read += bytes_read;
            journal.progress(&out);
            continue;
        }
        let bytes = store.get(&file.path).await?.bytes().await?;
        out.files_scanned += 1;
        out.bytes_read += bytes.len() as u64;
        let (filtered, new) = if dry_run {
            (count(bytes, kind, erasures).map_err(failed)?, None)
        } else {
            without(bytes, kind, erasures).map_err(failed)?
        };
        if filtered.removed > 0 {
            out.files_rewritten += 1;
            out.rows_removed += filtered.removed as u64;
            if kind == FileKind::Events {
                out.days.insert(file.dt);
            }
        }
        if let Some(new) = new {
            if kind == FileKind::Events {
                journal
                    .before_replace(file.dt)
                    .await
                    .map_err(RewriteError::Journal)?;
            }
            out.bytes_written += new.len() as u64;
            store.put(&file.path, PutPayload::from(new)).await?;
        }
        journal.progress(&out);
    }
    Ok(out)
}

/// `batch` (of `kind`) without the rows `erasures` names, and how many those were.
pub fn filter_batch(
    batch: RecordBatch,
    kind: FileKind,
    erasures: &Erasures,
) -> Result<(RecordBatch, usize), ParquetError> {
    let keep = keep_mask(&batch, kind, erasures)?;
    let removed = keep.false_count();
    if removed == 0 {
        return Ok((batch, 0));
    }
    Ok((filter_record_batch(&batch, &keep)?, removed))
}

/// True for each row of `batch` that is nobody erased's.
fn keep_mask(
    batch: &RecordBatch,
    kind: FileKind,
    erasures: &Erasures,
) -> Result<BooleanArray, ParquetError> {
    let column = |name: &str| -> Result<Arc<dyn Array>, ParquetError> {
        batch
            .column_by_name(name)
            .cloned()
            .ok_or_else(|| ParquetError::Schema(format!("no column {name}")))
    };
    let (partner, user, anonymous) = (
        column("partner_id")?,
        column("user_id")?,
        column("anonymous_id")?,
    );
    let strings = |a: &Arc<dyn Array>| -> Result<StringArray, ParquetError> {
        a.as_any()
            .downcast_ref::<StringArray>()
            .cloned()
            .ok_or_else(|| ParquetError::Schema("an id column is not text".into()))
    };
    let (partner, user, anonymous) = (strings(&partner)?, strings(&user)?, strings(&anonymous)?);
    fn text(a: &StringArray, i: usize) -> Option<&str> {
        (!a.is_null(i)).then(|| a.value(i))
    }
    let keep = (0..batch.num_rows()).map(|i| {
        let p = text(&partner, i).unwrap_or_default();
        let (u, a) = (text(&user, i), text(&anonymous, i));
        let erased = match kind {
            FileKind::Events => u.or(a).is_some_and(|id| erasures.contains(p, id)),
            FileKind::Identities => [u, a]
                .into_iter()
                .flatten()
                .any(|id| erasures.contains(p, id)),
        };
        Some(!erased)
    });
    Ok(keep.collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity_file::{self, ArchivedIdentity};
    use crate::parquet_file::{self, Codec};
    use crate::reader;
    use pulse_core::identity::{IdentityRecord, Link, Position};
    use pulse_core::{parse_event, Event, ParseContext};

    fn events() -> Vec<(i64, Event)> {
        let ctx = ParseContext::now();
        (0..300)
            .map(|i| {
                let json = match i % 3 {
                    0 => format!(r#"{{"event":"purchase","partner_id":"p1","user_id":"u{}","anonymous_id":"a{i}","cart_amount":"{i}.25","category":["a"]}}"#, i % 7),
                    1 => format!(r#"{{"event":"page_view","partner_id":"p1","anonymous_id":"a{}"}}"#, i % 5),
                    _ => format!(r#"{{"event":"page_view","partner_id":"p2","user_id":"u{}"}}"#, i % 7),
                };
                let e = parse_event(&json, &ctx).unwrap();
                (i as i64, Event::from_canonical_json(&e.to_canonical_json()).unwrap())
            })
            .collect()
    }

    #[test]
    fn an_events_file_loses_the_erased_rows_and_keeps_every_other_as_it_was() {
        let rows = events();
        let file = Bytes::from(parquet_file::write(3, &rows, Codec::Zstd).unwrap());
        let mut erasures = Erasures::default();
        let (f, none) = without(file.clone(), FileKind::Events, &erasures).unwrap();
        assert_eq!((f.rows, f.removed, none), (300, 0, None));
        erasures.insert("p1", "u3");
        erasures.insert("p1", "a0");
        let (f, new) = without(file.clone(), FileKind::Events, &erasures).unwrap();
        let expected: Vec<_> = reader::read(file)
            .unwrap()
            .into_iter()
            .filter(|r| !erasures.erases(&r.event))
            .collect();
        assert!(f.removed > 0 && f.removed < 300);
        assert_eq!(f.rows - f.removed, expected.len());
        let after = reader::read(Bytes::from(new.unwrap())).unwrap();
        assert_eq!(after, expected, "the others, value for value, in order");
        assert!(
            after
                .iter()
                .any(|r| r.event.partner_id == "p2" && r.event.user_id.as_deref() == Some("u3")),
            "another partner's u3 is kept"
        );
        assert!(after.iter().any(|r| r.event.user_id.is_some() && r.event.anonymous_id.as_deref() == Some("a0")),
            "another user's event on the erased device is theirs");
    }

    #[test]
    fn an_identity_file_loses_rows_naming_an_erased_device_or_person() {
        let link = |a: &str, u: &str, o: i64| ArchivedIdentity {
            partition: 0,
            offset: o,
            written_at: chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap(),
            record: IdentityRecord::Link(Link {
                partner_id: "p1".into(),
                anonymous_id: a.into(),
                user_id: u.into(),
                linked_at: chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap(),
                message_id: format!("m{o}"),
                origin: Position {
                    partition: 1,
                    offset: o,
                },
            }),
        };
        let rows = vec![
            link("a1", "u1", 1),
            link("a2", "u2", 2),
            link("a3", "u1", 3),
        ];
        let file = Bytes::from(identity_file::write(&rows, Codec::Snappy).unwrap());
        let mut erasures = Erasures::default();
        erasures.insert("p1", "u1");
        let (f, new) = without(file, FileKind::Identities, &erasures).unwrap();
        assert_eq!((f.rows, f.removed), (3, 2));
        let after = identity_file::read(Bytes::from(new.unwrap())).unwrap();
        assert_eq!(after, vec![rows[1].clone()]);
    }
}
