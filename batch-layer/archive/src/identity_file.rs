//! The speed layer's identity records (links, merges, refusals, forwarded events of merged
//! devices; see `pulse_core::identity`) → one Parquet file per unit and day, beside the
//! unit's event files and covered by the same marker; and back ([`read`]).
//!
//! They share the `events` topic so that they are ordered with the events they concern; the
//! archive keeps them apart from the events (a BI query over `events` never meets one) but in
//! the same units, so that the archive stays an exact prefix of the topic: what a reader that
//! folds it (a recompute) needs to resolve identities as the live layer did, and where the
//! warehouse's links come from. Each row carries its position, its kind and ids for queries,
//! and the record whole as JSON (the one form readers decode).

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{Int64Type, TimestampMicrosecondType};
use arrow::record_batch::RecordBatch;
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use chrono::{DateTime, Utc};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use pulse_core::identity::IdentityRecord;

use crate::parquet_file::ParquetError;

/// An identity record and where and when it was written to the `events` topic.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedIdentity {
    pub partition: i32,
    pub offset: i64,
    /// The Kafka record's timestamp: when the speed layer wrote it (the file's day).
    pub written_at: DateTime<Utc>,
    pub record: IdentityRecord,
}

/// The columns of an identity file.
pub fn identity_schema() -> Schema {
    let time = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Schema::new(vec![
        Field::new("kafka_partition", DataType::Int64, false),
        Field::new("kafka_offset", DataType::Int64, false),
        Field::new("written_at", time.clone(), false),
        // link, merge, refusal, forward, unlink
        Field::new("kind", DataType::Utf8, false),
        Field::new("partner_id", DataType::Utf8, false),
        // The device (null for a forward).
        Field::new("anonymous_id", DataType::Utf8, true),
        // The person.
        Field::new("user_id", DataType::Utf8, false),
        // When the link was seen (links and merges), or undone (unlinks).
        Field::new("linked_at", time, true),
        Field::new("record", DataType::Utf8, false),
    ])
}

fn parts(
    record: &IdentityRecord,
) -> (
    &'static str,
    &str,
    Option<&str>,
    &str,
    Option<DateTime<Utc>>,
) {
    match record {
        IdentityRecord::Link(l) => (
            "link",
            &l.partner_id,
            Some(&l.anonymous_id),
            &l.user_id,
            Some(l.linked_at),
        ),
        IdentityRecord::Merge(m) => (
            "merge",
            &m.partner_id,
            Some(&m.anonymous_id),
            &m.user_id,
            Some(m.linked_at),
        ),
        IdentityRecord::Refusal(r) => (
            "refusal",
            &r.partner_id,
            Some(&r.anonymous_id),
            &r.user_id,
            None,
        ),
        IdentityRecord::Forward(f) => ("forward", &f.partner_id, None, &f.user_id, None),
        IdentityRecord::Unlink(u) => (
            "unlink",
            &u.partner_id,
            Some(&u.anonymous_id),
            &u.user_id,
            Some(u.unlinked_at),
        ),
    }
}

/// `rows` as one Parquet file in memory.
pub fn write(
    rows: &[ArchivedIdentity],
    compression: impl Into<Compression>,
) -> Result<Vec<u8>, ParquetError> {
    let n = rows.len();
    let text = || StringBuilder::with_capacity(n, n * 16);
    let time = || TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let (mut partition, mut offset) = (
        Int64Builder::with_capacity(n),
        Int64Builder::with_capacity(n),
    );
    let (mut written_at, mut linked_at) = (time(), time());
    let (mut kind, mut partner, mut anonymous, mut user, mut json) =
        (text(), text(), text(), text(), text());
    for row in rows {
        let (k, p, a, u, at) = parts(&row.record);
        partition.append_value(i64::from(row.partition));
        offset.append_value(row.offset);
        written_at.append_value(row.written_at.timestamp_micros());
        kind.append_value(k);
        partner.append_value(p);
        anonymous.append_option(a);
        user.append_value(u);
        linked_at.append_option(at.map(|t| t.timestamp_micros()));
        json.append_value(String::from_utf8_lossy(&row.record.to_json()));
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(partition.finish()),
        Arc::new(offset.finish()),
        Arc::new(written_at.finish()),
        Arc::new(kind.finish()),
        Arc::new(partner.finish()),
        Arc::new(anonymous.finish()),
        Arc::new(user.finish()),
        Arc::new(linked_at.finish()),
        Arc::new(json.finish()),
    ];
    let batch = RecordBatch::try_new(Arc::new(identity_schema()), columns)?;
    let props = crate::parquet_file::writer_properties(compression.into(), batch.num_rows());
    let mut out = Vec::with_capacity(n * 256);
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(out)
}

/// Every row of an identity file, in its order.
pub fn read(bytes: bytes::Bytes) -> Result<Vec<ArchivedIdentity>, ParquetError> {
    let mut out = Vec::new();
    for batch in ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()? {
        let batch = batch?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| ParquetError::Schema(format!("no column {name}")))
        };
        let partition = column("kafka_partition")?.as_primitive_opt::<Int64Type>();
        let offset = column("kafka_offset")?.as_primitive_opt::<Int64Type>();
        let written = column("written_at")?.as_primitive_opt::<TimestampMicrosecondType>();
        let json = column("record")?.as_string_opt::<i32>();
        let (Some(partition), Some(offset), Some(written), Some(json)) =
            (partition, offset, written, json)
        else {
            return Err(ParquetError::Schema(
                "identity file columns of another type".into(),
            ));
        };
        for i in 0..batch.num_rows() {
            if partition.is_null(i) || offset.is_null(i) || written.is_null(i) || json.is_null(i) {
                return Err(ParquetError::Schema(format!(
                    "identity row {i} has a null position, time or record"
                )));
            }
            let record: IdentityRecord = serde_json::from_str(json.value(i))
                .map_err(|e| ParquetError::Schema(format!("identity row {i}: {e}")))?;
            out.push(ArchivedIdentity {
                partition: i32::try_from(partition.value(i)).map_err(|_| {
                    ParquetError::Schema(format!("identity row {i}: partition out of range"))
                })?,
                offset: offset.value(i),
                written_at: DateTime::from_timestamp_micros(written.value(i)).ok_or_else(|| {
                    ParquetError::Schema(format!("identity row {i}: time out of range"))
                })?,
                record,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parquet_file::Codec;
    use pulse_core::identity::{Forward, Link, Merge, Position};
    use pulse_core::{parse_event, ParseContext};

    #[test]
    fn identity_records_write_and_read_back_with_their_positions() {
        let at = DateTime::from_timestamp_millis(1_796_000_000_123).unwrap();
        let event = parse_event(
            r#"{"event":"add_to_cart","partner_id":"p","anonymous_id":"a","cart_amount":"2.5","timestamp":"2026-12-01T10:00:00Z"}"#,
            &ParseContext::now(),
        )
        .unwrap();
        let event = pulse_core::Event::from_canonical_json(&event.to_canonical_json()).unwrap();
        let position = Position {
            partition: 3,
            offset: 9,
        };
        let records = vec![
            IdentityRecord::Link(Link {
                partner_id: "p".into(),
                anonymous_id: "a".into(),
                user_id: "u".into(),
                linked_at: at,
                message_id: "m".into(),
                origin: position,
            }),
            IdentityRecord::Merge(Merge {
                partner_id: "p".into(),
                anonymous_id: "a".into(),
                user_id: "u".into(),
                linked_at: at,
                source: position,
                profile: Some(serde_json::json!({"event_count": 3})),
            }),
            IdentityRecord::Forward(Forward {
                partner_id: "p".into(),
                user_id: "u".into(),
                source: position,
                event: Box::new(event),
            }),
        ];
        let rows: Vec<ArchivedIdentity> = records
            .into_iter()
            .enumerate()
            .map(|(i, record)| ArchivedIdentity {
                partition: 5,
                offset: 100 + i as i64,
                written_at: at,
                record,
            })
            .collect();
        let bytes = write(&rows, Codec::Zstd).unwrap();
        assert_eq!(read(bytes::Bytes::from(bytes)).unwrap(), rows);
    }
}
