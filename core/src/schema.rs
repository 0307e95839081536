//! The Arrow schema of an archived event: one source of truth for the Parquet files, the
//! BigQuery table and the warehouse DDL.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, TimeUnit};

/// Precision and scale of `cart_amount`: BigQuery's NUMERIC, so loads keep every digit.
pub const AMOUNT_PRECISION: u8 = 38;
pub const AMOUNT_SCALE: i8 = 9;

/// The nine optional text fields of an event between `date` and `category`, in column order
/// (the writer and the reader of the archive walk them together).
pub const DESCRIPTIVE_STRINGS: [&str; 9] = [
    "session_id",
    "partner_name",
    "country",
    "language",
    "version",
    "user_agent",
    "referrer",
    "current_url",
    "page_type",
];

/// Columns in archive order. `date` is the UTC day of `timestamp`, the partition column.
/// The last two say where the event was read (the `events` topic's partition and offset), not
/// what it is: they make the archive an exact prefix of the topic, so a recompute folds each
/// partition's rows in offset order and hands over to Kafka at an exact offset.
pub fn event_schema() -> Schema {
    let utc = Some(Arc::from("UTC"));
    let text = |name: &str| Field::new(name, DataType::Utf8, true);
    let mut fields = vec![
        Field::new("message_id", DataType::Utf8, false),
        Field::new("event", DataType::Utf8, false),
        Field::new("partner_id", DataType::Utf8, false),
        text("user_id"),
        text("anonymous_id"),
        Field::new(
            "timestamp",
            DataType::Timestamp(TimeUnit::Microsecond, utc.clone()),
            false,
        ),
        Field::new(
            "received_at",
            DataType::Timestamp(TimeUnit::Microsecond, utc),
            false,
        ),
        Field::new("date", DataType::Date32, false),
    ];
    fields.extend(DESCRIPTIVE_STRINGS.map(text));
    fields.extend([
        Field::new(
            "category",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        ),
        text("search_query"),
        text("product_id"),
        Field::new(
            "cart_amount",
            DataType::Decimal128(AMOUNT_PRECISION, AMOUNT_SCALE),
            true,
        ),
        text("gender"),
        Field::new("init_session", DataType::Boolean, true),
        // Free objects as JSON text: BigQuery's JSON type loads from a string column.
        text("properties"),
        text("context"),
        // Nullable: files archived before positions were kept lack them, and SQL over an
        // archive that holds such files must still run (a recompute refuses those files).
        Field::new("kafka_partition", DataType::Int64, true),
        Field::new("kafka_offset", DataType::Int64, true),
    ]);
    Schema::new(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field of the canonical event has a column, and nothing else does (bar `date` and
    /// the record's position).
    #[test]
    fn schema_covers_event_fields() {
        let e = crate::parse::parse_event(
            r#"{"event":"x","partner_id":"p","user_id":"u","anonymous_id":"a","session_id":"s",
            "partner_name":"n","country":"TR","language":"tr","version":"1","user_agent":"ua",
            "referrer":"r","current_url":"c","page_type":"pt","category":"k","search_query":"q",
            "product_id":"pid","cart_amount":1,"gender":"f","init_session":true,
            "properties":{"a":1},"context":{"b":2}}"#,
            &crate::parse::ParseContext::now(),
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&e.to_canonical_json()).unwrap();
        let mut event_fields: Vec<String> = json.as_object().unwrap().keys().cloned().collect();
        event_fields.extend(["date", "kafka_partition", "kafka_offset"].map(String::from));
        event_fields.sort();
        let mut columns: Vec<String> = event_schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        columns.sort();
        assert_eq!(columns, event_fields);
    }
}
