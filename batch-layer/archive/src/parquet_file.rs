//! Events → one Parquet file, in the Arrow schema of `pulse-core` (the one source of truth),
//! each with the Kafka partition and offset it was read at; and back ([`read`]), for the
//! readers that fold the archive (recompute) rather than query it.

use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Int64Builder,
    ListBuilder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::record_batch::RecordBatch;
use chrono::NaiveDate;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use pulse_core::schema::{event_schema, AMOUNT_PRECISION, AMOUNT_SCALE};
use pulse_core::Event;
use rust_decimal::Decimal;

#[derive(Debug, thiserror::Error)]
pub enum ParquetError {
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// A file that is not in the archive's schema (a missing column, a wrong type).
    #[error("not an archive file: {0}")]
    Schema(String),
}

/// Codec of the archive files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Codec {
    Zstd,
    Snappy,
    None,
}

/// zstd's level when none is given: its own default, a good ratio at a few hundred MB/s.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

impl Codec {
    /// The compression of files in this codec; `zstd_level` (1..=22; out of range, level 1)
    /// only for [`Codec::Zstd`].
    pub fn compression(self, zstd_level: i32) -> Compression {
        match self {
            Codec::Zstd => Compression::ZSTD(ZstdLevel::try_new(zstd_level).unwrap_or_default()),
            Codec::Snappy => Compression::SNAPPY,
            Codec::None => Compression::UNCOMPRESSED,
        }
    }
}

impl From<Codec> for Compression {
    fn from(codec: Codec) -> Self {
        codec.compression(DEFAULT_ZSTD_LEVEL)
    }
}

const EPOCH: NaiveDate = match NaiveDate::from_ymd_opt(1970, 1, 1) {
    Some(d) => d,
    None => panic!("valid date"),
};

/// An archived event and where it was read in the `events` topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Archived {
    pub partition: i32,
    pub offset: i64,
    pub event: Event,
}

/// The events of `partition`, each with its offset, as one Arrow record batch.
pub fn record_batch(partition: i32, rows: &[(i64, Event)]) -> Result<RecordBatch, ParquetError> {
    let mut builder = RowsBuilder::new(partition, rows.len());
    for (offset, e) in rows {
        builder.push(*offset, e);
    }
    builder.finish()
}

/// One file's rows as they come, column by column: the archiver appends each event as it
/// reads it and drops the event, so a unit waiting to roll holds its columns (about the
/// bytes of its values) rather than an `Event` per row (a struct and a dozen allocations).
pub struct RowsBuilder {
    partition: i64,
    rows: usize,
    message_id: StringBuilder,
    event: StringBuilder,
    partner_id: StringBuilder,
    user_id: StringBuilder,
    anonymous_id: StringBuilder,
    timestamp: TimestampMicrosecondBuilder,
    received_at: TimestampMicrosecondBuilder,
    date: Date32Builder,
    /// `session_id` … `page_type`, in schema order.
    strings: [StringBuilder; 9],
    category: ListBuilder<StringBuilder>,
    search_query: StringBuilder,
    product_id: StringBuilder,
    cart_amount: Decimal128Builder,
    gender: StringBuilder,
    init_session: BooleanBuilder,
    properties: StringBuilder,
    context: StringBuilder,
    kafka_partition: Int64Builder,
    kafka_offset: Int64Builder,
}

/// How large a file's columns grew: rows, and the bytes of each text column's values. The
/// next file of the same source starts with room for as much (and an eighth), so its buffers
/// are allocated once instead of doubled as they fill: each doubling of a large buffer is
/// fresh memory the kernel zeroes, then a copy, and that was a sixth of the archiver's
/// consuming thread. Room not used costs address space, not memory: pages are only mapped
/// when written.
#[derive(Debug, Clone, Default)]
pub struct RowsSize {
    rows: usize,
    /// The text columns' value bytes, in the order [`RowsBuilder::with_room`] makes them.
    text: Vec<usize>,
    categories: usize,
    category_bytes: usize,
}

impl RowsBuilder {
    /// Rows of `partition`, room for `capacity` of them to start with.
    pub fn new(partition: i32, capacity: usize) -> Self {
        Self::with_room(partition, capacity, || capacity * 16, (0, 0))
    }

    /// Rows of `partition` with room for what a file of `size` held.
    pub fn sized_like(partition: i32, size: &RowsSize) -> Self {
        let more = |n: usize| n + n / 8;
        let mut text = size.text.iter().map(|b| more(*b));
        Self::with_room(
            partition,
            more(size.rows),
            || text.next().unwrap_or_default(),
            (more(size.categories), more(size.category_bytes)),
        )
    }

    /// How large the columns are now (see [`RowsSize`]).
    pub fn size(&self) -> RowsSize {
        // The text columns in the order `with_room` makes them (the fields' order).
        let text = [
            &self.message_id,
            &self.event,
            &self.partner_id,
            &self.user_id,
            &self.anonymous_id,
        ]
        .into_iter()
        .chain(&self.strings)
        .chain([
            &self.search_query,
            &self.product_id,
            &self.gender,
            &self.properties,
            &self.context,
        ])
        .map(|b| b.values_slice().len())
        .collect();
        let categories = self.category.values_ref();
        RowsSize {
            rows: self.rows,
            text,
            categories: categories.len(),
            category_bytes: categories.values_slice().len(),
        }
    }

    /// Rows of `partition`, room for `n` of them, each text column's values getting
    /// `text_bytes()` bytes (called once per text column, in the fields' order), the
    /// categories room for `(values, bytes)`.
    fn with_room(
        partition: i32,
        n: usize,
        mut text_bytes: impl FnMut() -> usize,
        (categories, category_bytes): (usize, usize),
    ) -> Self {
        let mut text = || StringBuilder::with_capacity(n, text_bytes());
        let time = || TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        Self {
            partition: partition.into(),
            rows: 0,
            message_id: text(),
            event: text(),
            partner_id: text(),
            user_id: text(),
            anonymous_id: text(),
            timestamp: time(),
            received_at: time(),
            date: Date32Builder::with_capacity(n),
            strings: std::array::from_fn(|_| text()),
            category: ListBuilder::with_capacity(
                StringBuilder::with_capacity(categories, category_bytes),
                n,
            ),
            search_query: text(),
            product_id: text(),
            cart_amount: Decimal128Builder::with_capacity(n),
            gender: text(),
            init_session: BooleanBuilder::with_capacity(n),
            properties: text(),
            context: text(),
            kafka_partition: Int64Builder::with_capacity(n),
            kafka_offset: Int64Builder::with_capacity(n),
        }
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Appends the event read at `offset`.
    pub fn push(&mut self, offset: i64, e: &Event) {
        self.rows += 1;
        self.kafka_partition.append_value(self.partition);
        self.kafka_offset.append_value(offset);
        self.message_id.append_value(&e.message_id);
        self.event.append_value(&e.event);
        self.partner_id.append_value(&e.partner_id);
        self.user_id.append_option(e.user_id.as_deref());
        self.anonymous_id.append_option(e.anonymous_id.as_deref());
        self.timestamp.append_value(e.timestamp.timestamp_micros());
        self.received_at
            .append_value(e.received_at.timestamp_micros());
        self.date
            .append_value((e.timestamp.date_naive() - EPOCH).num_days() as i32);
        for (b, v) in self.strings.iter_mut().zip([
            &e.session_id,
            &e.partner_name,
            &e.country,
            &e.language,
            &e.version,
            &e.user_agent,
            &e.referrer,
            &e.current_url,
            &e.page_type,
        ]) {
            b.append_option(v.as_deref());
        }
        if e.category.is_empty() {
            self.category.append_null();
        } else {
            for c in &e.category {
                self.category.values().append_value(c);
            }
            self.category.append(true);
        }
        self.search_query.append_option(e.search_query.as_deref());
        self.product_id.append_option(e.product_id.as_deref());
        self.cart_amount
            .append_option(e.cart_amount.and_then(scaled));
        self.gender.append_option(e.gender.as_deref());
        self.init_session.append_option(e.init_session);
        let object = |m: &Option<serde_json::Map<String, serde_json::Value>>| {
            m.as_ref()
                .map(|m| serde_json::to_string(m).unwrap_or_else(|_| "{}".to_string()))
        };
        self.properties.append_option(object(&e.properties));
        self.context.append_option(object(&e.context));
    }

    /// The rows so far as a record batch in the archive's schema; the builder is empty after.
    pub fn finish(&mut self) -> Result<RecordBatch, ParquetError> {
        self.rows = 0;
        let amounts = self
            .cart_amount
            .finish()
            .with_precision_and_scale(AMOUNT_PRECISION, AMOUNT_SCALE)?;
        // Column order is the schema's: the nine optional strings sit between `date` and
        // `category`.
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.message_id.finish()),
            Arc::new(self.event.finish()),
            Arc::new(self.partner_id.finish()),
            Arc::new(self.user_id.finish()),
            Arc::new(self.anonymous_id.finish()),
            Arc::new(self.timestamp.finish()),
            Arc::new(self.received_at.finish()),
            Arc::new(self.date.finish()),
        ];
        columns.extend(
            self.strings
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        columns.extend([
            Arc::new(self.category.finish()) as ArrayRef,
            Arc::new(self.search_query.finish()),
            Arc::new(self.product_id.finish()),
            Arc::new(amounts),
            Arc::new(self.gender.finish()),
            Arc::new(self.init_session.finish()),
            Arc::new(self.properties.finish()),
            Arc::new(self.context.finish()),
            Arc::new(self.kafka_partition.finish()),
            Arc::new(self.kafka_offset.finish()),
        ]);
        Ok(RecordBatch::try_new(Arc::new(event_schema()), columns)?)
    }
}

/// The amount as an i128 at the schema's scale, or None when it does not fit (logged by the
/// caller through the null: the raw event still has it in Kafka and the dead-letter path).
fn scaled(d: Decimal) -> Option<i128> {
    let mut d = d;
    d.rescale(AMOUNT_SCALE as u32);
    (d.scale() == AMOUNT_SCALE as u32).then(|| d.mantissa())
}

/// Columns whose every value is (nearly) its own: a dictionary of them is as large as the
/// column and costs a hash per value to build, so they are written plainly. The dictionary
/// stays on for every other column (event names, partners, countries, categories repeat).
const UNIQUE_COLUMNS: [&str; 4] = ["message_id", "timestamp", "received_at", "kafka_offset"];

/// Most rows in one row group of an archive file.
const MAX_ROW_GROUP_ROWS: usize = 128 * 1024;

/// How every archive file of `rows` rows is written (the archiver's, and an erasure's
/// rewrite of one); `rows` sizes the id columns' bloom filters.
pub fn writer_properties(compression: Compression, rows: usize) -> WriterProperties {
    let mut builder = WriterProperties::builder()
        .set_compression(compression)
        .set_max_row_group_row_count(Some(MAX_ROW_GROUP_ROWS))
        .set_created_by("pulse-archiver".into());
    for column in UNIQUE_COLUMNS {
        builder = builder.set_column_dictionary_enabled(ColumnPath::from(column), false);
    }
    crate::bloom::with_id_filters(builder, rows.min(MAX_ROW_GROUP_ROWS)).build()
}

/// The events of `partition` (with their offsets) as a Parquet file in memory.
pub fn write(
    partition: i32,
    rows: &[(i64, Event)],
    compression: impl Into<Compression>,
) -> Result<Vec<u8>, ParquetError> {
    write_batch(&record_batch(partition, rows)?, compression)
}

/// A batch in the archive's schema as a Parquet file in memory.
pub fn write_batch(
    batch: &RecordBatch,
    compression: impl Into<Compression>,
) -> Result<Vec<u8>, ParquetError> {
    let props = writer_properties(compression.into(), batch.num_rows());
    let mut out = Vec::with_capacity(batch.num_rows() * 64);
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))?;
    writer.write(batch)?;
    writer.close()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulse_core::{parse_event, ParseContext};

    /// Written and read back, every event is what it was (amounts equal as numbers), with
    /// its partition and offset.
    #[test]
    fn writes_and_reads_back() {
        let ctx = ParseContext::now();
        let rows: Vec<(i64, Event)> = (0..100)
            .map(|i| {
                let json = match i % 3 {
                    0 => format!(r#"{{"event":"purchase","partner_id":"p","user_id":"u{i}","cart_amount":"{i}.25","category":["a","b"],"properties":{{"k":{i},"n":{{"x":[1,"y"]}}}}}}"#),
                    1 => format!(r#"{{"event":"page_view","partner_id":"p","anonymous_id":"a{i}","gender":"f","init_session":true,"context":{{"ip":"1.2.3.4"}}}}"#),
                    _ => format!(r#"{{"event":"add_to_cart","partner_id":"q","user_id":"u{i}","cart_amount":"0.000000001","country":"TR","timestamp":"2026-11-30T23:59:59.999Z"}}"#),
                };
                // As the archiver has it: read from Kafka (millisecond timestamps).
                let event = parse_event(&json, &ctx).unwrap();
                let event = Event::from_canonical_json(&event.to_canonical_json()).unwrap();
                (1000 + 2 * i, event)
            })
            .collect();
        let bytes = write(7, &rows, Codec::Zstd).unwrap();
        let back = crate::reader::read(bytes::Bytes::from(bytes)).unwrap();
        assert_eq!(back.len(), rows.len());
        for (got, (offset, event)) in back.iter().zip(&rows) {
            assert_eq!((got.partition, got.offset), (7, *offset));
            assert_eq!(&got.event, event);
        }
    }

    /// A builder started with room for what a full one held builds the same batch, and its
    /// size names every text column.
    /// The four unique columns have no dictionary (the others keep theirs), and the id
    /// columns' bloom filters are made for the file's rows.
    #[test]
    fn unique_columns_are_written_plainly_and_filters_fit_the_rows() {
        let ctx = ParseContext::now();
        let rows: Vec<(i64, Event)> = (0..1000)
            .map(|i| {
                let json = format!(r#"{{"event":"page_view","partner_id":"p","user_id":"u{i}"}}"#);
                (i, parse_event(&json, &ctx).unwrap())
            })
            .collect();
        let bytes = bytes::Bytes::from(write(7, &rows, Codec::Zstd).unwrap());
        let reader = parquet::file::serialized_reader::SerializedFileReader::new(bytes).unwrap();
        let group = parquet::file::reader::FileReader::metadata(&reader).row_group(0);
        let column = |name: &str| {
            group
                .columns()
                .iter()
                .find(|c| c.column_path().string() == name)
                .unwrap()
        };
        for name in UNIQUE_COLUMNS {
            assert!(column(name).dictionary_page_offset().is_none(), "{name}");
        }
        assert!(column("event").dictionary_page_offset().is_some());
        // Made for the file's 1,000 rows, not the parquet crate's million (2 MiB each before
        // it folds them down: the written file does not show it, the properties do).
        let props = writer_properties(Codec::Zstd.into(), rows.len());
        for name in crate::bloom::ID_COLUMNS {
            assert!(column(name).bloom_filter_offset().is_some(), "{name}");
            let filter = props.bloom_filter_properties(&ColumnPath::from(name));
            assert_eq!(filter.map(|f| f.ndv()), Some(1000), "{name}");
        }
    }

    #[test]
    fn a_builder_sized_like_another_builds_the_same_rows() {
        let ctx = ParseContext::now();
        let events: Vec<Event> = (0..50)
            .map(|i| {
                let json = format!(
                    r#"{{"event":"product_view","partner_id":"p","user_id":"u{i}","category":["c{i}"],"user_agent":"UA/{i}","properties":{{"k":{i}}}}}"#
                );
                parse_event(&json, &ctx).unwrap()
            })
            .collect();
        let mut first = RowsBuilder::new(3, 4);
        for (i, e) in events.iter().enumerate() {
            first.push(i as i64, e);
        }
        let size = first.size();
        assert_eq!((size.rows, size.text.len(), size.categories), (50, 19, 50));
        assert!(
            size.text.iter().all(|b| *b < 2_000) && size.text[0] > 0,
            "{size:?}"
        );
        let mut second = RowsBuilder::sized_like(3, &size);
        for (i, e) in events.iter().enumerate() {
            second.push(i as i64, e);
        }
        assert_eq!(second.finish().unwrap(), first.finish().unwrap());
        assert!(RowsBuilder::sized_like(3, &RowsSize::default()).is_empty());
    }

    /// A row archived before positions were kept (NULL columns, still readable by SQL) is
    /// refused by the reader: it cannot be placed in offset order.
    #[test]
    fn a_row_without_its_position_is_refused() {
        let event = parse_event(
            r#"{"event":"x","partner_id":"p","user_id":"u"}"#,
            &ParseContext::now(),
        )
        .unwrap();
        let batch = record_batch(0, &[(5, event)]).unwrap();
        let mut columns = batch.columns().to_vec();
        let n = columns.len();
        for c in &mut columns[n - 2..] {
            *c = arrow::array::new_null_array(&arrow_schema::DataType::Int64, 1);
        }
        let old = RecordBatch::try_new(batch.schema(), columns).unwrap();
        let err = crate::reader::rows(&old).unwrap_err().to_string();
        assert!(err.contains("before positions were kept"), "{err}");
    }

    /// A file in another schema is refused with the column named, not misread.
    #[test]
    fn a_file_without_positions_is_refused() {
        use arrow::array::StringArray;
        let schema = arrow_schema::Schema::new(vec![arrow_schema::Field::new(
            "message_id",
            arrow_schema::DataType::Utf8,
            false,
        )]);
        let batch = RecordBatch::try_new(
            Arc::new(schema),
            vec![Arc::new(StringArray::from(vec!["m"])) as ArrayRef],
        )
        .unwrap();
        let err = crate::reader::rows(&batch).unwrap_err().to_string();
        assert!(err.contains("no column"), "{err}");
    }
}
