//! The BigQuery table schema, derived from the archive's Arrow schema so the two cannot drift:
//! the loader creates the table from it and a test checks `warehouse-sql/ddl/events.sql`
//! against it.

use arrow_schema::{DataType, Field};
use gcp_bigquery_client::model::field_type::FieldType;
use gcp_bigquery_client::model::table_field_schema::TableFieldSchema;
use gcp_bigquery_client::model::table_schema::TableSchema;
use pulse_core::schema::{event_schema, AMOUNT_PRECISION, AMOUNT_SCALE};

/// The column BigQuery partitions the table by (one partition per UTC day of the event).
pub const PARTITION_COLUMN: &str = "date";

/// The GoogleSQL type name of an archive column, as written in DDL (`ARRAY<STRING>`, …).
pub fn ddl_type(t: &DataType) -> Option<String> {
    Some(match t {
        DataType::List(item) => format!("ARRAY<{}>", ddl_type(item.data_type())?),
        other => scalar(other)?.1.to_string(),
    })
}

/// (REST API field type, DDL name) of a non-list column. Only the types the event schema
/// uses are mapped; anything else is a programming error caught by the tests.
fn scalar(t: &DataType) -> Option<(FieldType, &'static str)> {
    Some(match t {
        DataType::Utf8 => (FieldType::String, "STRING"),
        DataType::Boolean => (FieldType::Bool, "BOOL"),
        DataType::Date32 => (FieldType::Date, "DATE"),
        DataType::Int64 => (FieldType::Integer, "INT64"),
        DataType::Timestamp(_, _) => (FieldType::Timestamp, "TIMESTAMP"),
        // BigQuery NUMERIC is exactly DECIMAL(38, 9): every cent survives the load.
        DataType::Decimal128(p, s) if (*p, *s) == (AMOUNT_PRECISION, AMOUNT_SCALE) => {
            (FieldType::Numeric, "NUMERIC")
        }
        _ => return None,
    })
}

fn field(f: &Field) -> TableFieldSchema {
    let (item, mode) = match f.data_type() {
        DataType::List(item) => (item.data_type(), "REPEATED"),
        t if f.is_nullable() => (t, "NULLABLE"),
        t => (t, "REQUIRED"),
    };
    let (ty, _) = scalar(item)
        .unwrap_or_else(|| panic!("event schema column {} has no BigQuery type", f.name()));
    let mut out = TableFieldSchema::new(f.name(), ty);
    out.mode = Some(mode.to_string());
    out
}

/// The `events` table schema for the REST API.
pub fn table_schema() -> TableSchema {
    TableSchema::new(event_schema().fields().iter().map(|f| field(f)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_column_maps() {
        let schema = table_schema();
        let fields = schema.fields().as_ref().unwrap();
        assert_eq!(fields.len(), event_schema().fields().len());
        let by_name = |n: &str| fields.iter().find(|f| f.name == n).unwrap();
        assert_eq!(by_name("category").mode.as_deref(), Some("REPEATED"));
        assert_eq!(by_name("date").mode.as_deref(), Some("REQUIRED"));
        assert_eq!(by_name("user_id").mode.as_deref(), Some("NULLABLE"));
        assert!(matches!(by_name("cart_amount").r#type, FieldType::Numeric));
        assert!(event_schema().field_with_name(PARTITION_COLUMN).is_ok());
    }
}
