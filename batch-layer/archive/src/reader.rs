//! Archive files back to events, for the readers that fold the archive (recompute) rather
//! than query it: the inverse of [`crate::parquet_file::record_batch`], column by column.

use arrow::array::{
    Array, AsArray, BooleanArray, Decimal128Array, Int64Array, ListArray, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{Decimal128Type, Int64Type, TimestampMicrosecondType};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use pulse_core::schema::{AMOUNT_SCALE, DESCRIPTIVE_STRINGS};
use pulse_core::Event;
use rust_decimal::Decimal;

use crate::parquet_file::{Archived, ParquetError};

/// Every row of an archive file, in file order (the archiver writes a file's rows in offset
/// order).
pub fn read(bytes: Bytes) -> Result<Vec<Archived>, ParquetError> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
    let mut out = Vec::new();
    for batch in reader {
        out.extend(rows(&batch?)?);
    }
    Ok(out)
}

/// The rows of one record batch in the archive's schema.
pub fn rows(batch: &RecordBatch) -> Result<Vec<Archived>, ParquetError> {
    let c = Columns::of(batch)?;
    (0..batch.num_rows()).map(|i| c.row(i)).collect()
}

/// The archive's columns of one batch, typed.
struct Columns<'a> {
    message_id: &'a StringArray,
    event: &'a StringArray,
    partner_id: &'a StringArray,
    user_id: &'a StringArray,
    anonymous_id: &'a StringArray,
    timestamp: &'a TimestampMicrosecondArray,
    received_at: &'a TimestampMicrosecondArray,
    /// `session_id` … `page_type`, in schema order.
    strings: [&'a StringArray; 9],
    category: &'a ListArray,
    search_query: &'a StringArray,
    product_id: &'a StringArray,
    cart_amount: &'a Decimal128Array,
    gender: &'a StringArray,
    init_session: &'a BooleanArray,
    properties: &'a StringArray,
    context: &'a StringArray,
    kafka_partition: &'a Int64Array,
    kafka_offset: &'a Int64Array,
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a dyn Array, ParquetError> {
    batch
        .column_by_name(name)
        .map(|c| c.as_ref())
        .ok_or_else(|| ParquetError::Schema(format!("no column {name}")))
}

fn text<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a StringArray, ParquetError> {
    column(batch, name)?
        .as_string_opt::<i32>()
        .ok_or_else(|| ParquetError::Schema(format!("{name} is not a string column")))
}

fn wrong(name: &str, what: &str) -> ParquetError {
    ParquetError::Schema(format!("{name} is not {what}"))
}

impl<'a> Columns<'a> {
    fn of(b: &'a RecordBatch) -> Result<Self, ParquetError> {
        let time = |name: &str| {
            column(b, name)?
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or_else(|| wrong(name, "a microsecond timestamp"))
        };
        let int = |name: &str| {
            column(b, name)?
                .as_primitive_opt::<Int64Type>()
                .ok_or_else(|| wrong(name, "an INT64 column"))
        };
        let mut strings = Vec::with_capacity(DESCRIPTIVE_STRINGS.len());
        for n in DESCRIPTIVE_STRINGS {
            strings.push(text(b, n)?);
        }
        Ok(Self {
            message_id: text(b, "message_id")?,
            event: text(b, "event")?,
            partner_id: text(b, "partner_id")?,
            user_id: text(b, "user_id")?,
            anonymous_id: text(b, "anonymous_id")?,
            timestamp: time("timestamp")?,
            received_at: time("received_at")?,
            strings: strings
                .try_into()
                .map_err(|_| wrong("the optional strings", "complete"))?,
            category: column(b, "category")?
                .as_list_opt::<i32>()
                .ok_or_else(|| wrong("category", "a list"))?,
            search_query: text(b, "search_query")?,
            product_id: text(b, "product_id")?,
            cart_amount: column(b, "cart_amount")?
                .as_primitive_opt::<Decimal128Type>()
                .ok_or_else(|| wrong("cart_amount", "a decimal"))?,
            gender: text(b, "gender")?,
            init_session: column(b, "init_session")?
                .as_boolean_opt()
                .ok_or_else(|| wrong("init_session", "a boolean"))?,
            properties: text(b, "properties")?,
            context: text(b, "context")?,
            kafka_partition: int("kafka_partition")?,
            kafka_offset: int("kafka_offset")?,
        })
    }

    fn row(&self, i: usize) -> Result<Archived, ParquetError> {
        let opt = |a: &StringArray| a.is_valid(i).then(|| a.value(i).to_string());
        let time = |a: &TimestampMicrosecondArray, name: &str| -> Result<DateTime<Utc>, _> {
            DateTime::from_timestamp_micros(a.value(i)).ok_or_else(|| wrong(name, "in range"))
        };
        let object = |a: &StringArray, name: &str| -> Result<_, ParquetError> {
            match opt(a) {
                None => Ok(None),
                Some(json) => serde_json::from_str(&json)
                    .map(Some)
                    .map_err(|e| ParquetError::Schema(format!("{name}: {e}"))),
            }
        };
        let category = match self.category.is_valid(i) {
            false => Vec::new(),
            true => {
                let items = self.category.value(i);
                let items = items
                    .as_string_opt::<i32>()
                    .ok_or_else(|| wrong("category", "a list of strings"))?;
                items.iter().flatten().map(str::to_string).collect()
            }
        };
        let cart_amount = match self.cart_amount.is_valid(i) {
            false => None,
            true => Some(
                Decimal::try_from_i128_with_scale(self.cart_amount.value(i), AMOUNT_SCALE as u32)
                    .map_err(|e| ParquetError::Schema(format!("cart_amount: {e}")))?,
            ),
        };
        let [session_id, partner_name, country, language, version, user_agent, referrer, current_url, page_type] =
            self.strings.map(opt);
        let event = Event {
            message_id: self.message_id.value(i).to_string(),
            event: self.event.value(i).to_string(),
            partner_id: self.partner_id.value(i).to_string(),
            user_id: opt(self.user_id),
            anonymous_id: opt(self.anonymous_id),
            timestamp: time(self.timestamp, "timestamp")?,
            received_at: time(self.received_at, "received_at")?,
            session_id,
            partner_name,
            country,
            language,
            version,
            user_agent,
            referrer,
            current_url,
            page_type,
            category,
            search_query: opt(self.search_query),
            product_id: opt(self.product_id),
            cart_amount,
            gender: opt(self.gender),
            init_session: self
                .init_session
                .is_valid(i)
                .then(|| self.init_session.value(i)),
            properties: object(self.properties, "properties")?,
            context: object(self.context, "context")?,
        };
        if !(self.kafka_partition.is_valid(i) && self.kafka_offset.is_valid(i)) {
            return Err(ParquetError::Schema(
                "a row without kafka_partition/kafka_offset (archived before positions were \
                 kept): it cannot be placed in offset order"
                    .into(),
            ));
        }
        Ok(Archived {
            partition: i32::try_from(self.kafka_partition.value(i))
                .map_err(|_| wrong("kafka_partition", "a partition number"))?,
            offset: self.kafka_offset.value(i),
            event,
        })
    }
}
