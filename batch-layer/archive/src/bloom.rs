//! Bloom filters on the id columns (`user_id`, `anonymous_id`) of every archive file, so an
//! erasure finds the files that may hold a person without reading the rest.
//!
//! Every writer of archive files (the archiver's events and identity records, an erasure's
//! rewrite) writes one split-block filter per id column and row group, sized by the parquet
//! crate for the values it holds at a 1 % false-positive rate. A probe reads the file's footer
//! and those filters (ranged reads: a few KiB, not the file); a file whose filters rule out
//! every erased id cannot hold their rows and is passed over. A file without them (written
//! before they existed) is read whole, as before.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use parquet::file::properties::WriterPropertiesBuilder;
use parquet::schema::types::ColumnPath;

use crate::layout::ArchiveFile;
use crate::parquet_file::ParquetError;

/// The columns with a filter: every id an erasure matches a row by.
pub const ID_COLUMNS: [&str; 2] = ["user_id", "anonymous_id"];

/// The false-positive rate of each filter: a file is read for nothing about once in a
/// hundred probes per erased id.
const FPP: f64 = 0.01;

/// `builder` writing a filter on each id column of a file of at most `rows` rows per row group.
///
/// The parquet crate makes each filter for the number of distinct values it is told (a
/// million when it is not: 2 MiB per column and row group, zeroed by the kernel as it is
/// touched) and folds it down once the values are in. Telling it the rows, an upper bound of
/// the distinct ids, makes the filter of a 20,000-row file about 32 KiB from the start.
pub fn with_id_filters(
    mut builder: WriterPropertiesBuilder,
    rows: usize,
) -> WriterPropertiesBuilder {
    let ndv = rows.max(1) as u64;
    for column in ID_COLUMNS {
        let path = ColumnPath::from(column);
        builder = builder
            .set_column_bloom_filter_enabled(path.clone(), true)
            .set_column_bloom_filter_fpp(path.clone(), FPP)
            .set_column_bloom_filter_max_ndv(path, ndv);
    }
    builder
}

/// What probing a file found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Its filters rule out every id: it holds none of their rows.
    Clear {
        /// Bytes the probe read: the footer and the filters.
        bytes_read: u64,
    },
    /// A filter may hold one of the ids, or a row group has no filter: read it.
    MayHold,
}

/// Whether `file` may hold a row with any of `ids` in an id column.
pub async fn probe(
    store: Arc<dyn ObjectStore>,
    file: &ArchiveFile,
    ids: &[&str],
) -> Result<Probe, ParquetError> {
    let bytes_read = Arc::new(AtomicU64::new(0));
    let reader = RangeReader {
        store,
        path: file.path.clone(),
        size: file.size,
        bytes_read: bytes_read.clone(),
    };
    let mut builder = ParquetRecordBatchStreamBuilder::new(reader).await?;
    let metadata = builder.metadata().clone();
    let schema = metadata.file_metadata().schema_descr();
    let columns: Vec<usize> = (0..schema.num_columns())
        .filter(|&i| ID_COLUMNS.contains(&schema.column(i).name()))
        .collect();
    if columns.len() != ID_COLUMNS.len() {
        return Ok(Probe::MayHold);
    }
    for rg in 0..metadata.num_row_groups() {
        for &column in &columns {
            let filter = builder
                .get_row_group_column_bloom_filter(rg, column)
                .await?;
            match filter {
                Some(filter) if !ids.iter().any(|id| filter.check(*id)) => {}
                // One of them may be there, or there is no filter to say.
                _ => return Ok(Probe::MayHold),
            }
        }
    }
    let bytes_read = bytes_read.load(Ordering::Relaxed);
    Ok(Probe::Clear { bytes_read })
}

/// Ranged reads of one archive file, counted. The file's size comes from the listing, so
/// the footer is one ranged read (no request for the size, no suffix request).
struct RangeReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
    bytes_read: Arc<AtomicU64>,
}

fn external(e: object_store::Error) -> parquet::errors::ParquetError {
    parquet::errors::ParquetError::External(Box::new(e))
}

impl AsyncFileReader for RangeReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            let bytes = self
                .store
                .get_range(&self.path, range)
                .await
                .map_err(external)?;
            self.bytes_read
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            Ok(bytes)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let size = self.size;
            let metadata = ParquetMetaDataReader::new()
                .with_arrow_reader_options(options)
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{data_path, FileRange};
    use crate::parquet_file::{write, Codec};
    use chrono::NaiveDate;
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, PutPayload};
    use pulse_core::{parse_event, Event, ParseContext};

    /// A file of 500 events of users `u0`…`u249` and devices `a0`…`a249`, in `store`.
    async fn file(store: &Arc<dyn ObjectStore>, bytes: Vec<u8>) -> ArchiveFile {
        let dt = NaiveDate::from_ymd_opt(2026, 12, 7).unwrap();
        let range = FileRange {
            partition: 3,
            first: 0,
            last: 499,
        };
        let path = data_path(dt, range);
        let size = bytes.len() as u64;
        store.put(&path, PutPayload::from(bytes)).await.unwrap();
        ArchiveFile {
            path,
            dt,
            range,
            size,
        }
    }

    fn rows() -> Vec<(i64, Event)> {
        let ctx = ParseContext::now();
        (0..500)
            .map(|i| {
                let json = match i % 2 {
                    0 => format!(
                        r#"{{"event":"page_view","partner_id":"p","user_id":"u{}"}}"#,
                        i / 2
                    ),
                    _ => format!(
                        r#"{{"event":"page_view","partner_id":"p","anonymous_id":"a{}"}}"#,
                        i / 2
                    ),
                };
                (i, parse_event(&json, &ctx).unwrap())
            })
            .collect()
    }

    #[tokio::test]
    async fn a_file_is_passed_over_only_when_its_filters_rule_out_every_id() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let f = file(&store, write(3, &rows(), Codec::Zstd).unwrap()).await;
        for present in [["u17"], ["a249"]] {
            let got = probe(store.clone(), &f, &present).await.unwrap();
            assert_eq!(got, Probe::MayHold, "{present:?}");
        }
        let absent = ["u250", "a250", "u-17", "someone-else"];
        let got = probe(store.clone(), &f, &absent).await.unwrap();
        assert!(
            matches!(got, Probe::Clear { bytes_read } if bytes_read > 0 && bytes_read < f.size),
            "{got:?}"
        );
        // One id of the file among absent ones is enough to read it.
        let got = probe(store.clone(), &f, &["u250", "a3"]).await.unwrap();
        assert_eq!(got, Probe::MayHold);
    }

    /// A file written before the filters existed is always read.
    #[tokio::test]
    async fn a_file_without_filters_may_hold_anyone() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let batch = crate::parquet_file::record_batch(3, &rows()).unwrap();
        let mut bytes = Vec::new();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let f = file(&store, bytes).await;
        let got = probe(store.clone(), &f, &["nobody"]).await.unwrap();
        assert_eq!(got, Probe::MayHold);
    }
}
