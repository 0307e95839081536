//! The warehouse DDL matches the Arrow schema of the archive, column for column.

use arrow_schema::DataType;
use pulse_core::schema::{event_schema, AMOUNT_PRECISION, AMOUNT_SCALE};

/// BigQuery type of an archive column.
fn bigquery_type(t: &DataType) -> String {
    match t {
        DataType::Utf8 => "STRING".into(),
        DataType::Boolean => "BOOL".into(),
        DataType::Date32 => "DATE".into(),
        DataType::Timestamp(_, _) => "TIMESTAMP".into(),
        DataType::Decimal128(p, s) if (*p, *s) == (AMOUNT_PRECISION, AMOUNT_SCALE) => {
            "NUMERIC".into()
        }
        DataType::List(f) => format!("ARRAY<{}>", bigquery_type(f.data_type())),
        other => panic!("no BigQuery type for {other}"),
    }
}

#[test]
fn ddl_columns_match_the_arrow_schema() {
    let ddl = include_str!("../../warehouse-sql/ddl/events.sql");
    let body = ddl
        .split_once("events (")
        .unwrap()
        .1
        .split_once("\n)")
        .unwrap()
        .0;
    let columns: Vec<(String, String, bool)> = body
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("--"))
        .map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next().unwrap().to_string();
            let ty = words.next().unwrap().trim_end_matches(',').to_string();
            (name, ty, l.contains("NOT NULL"))
        })
        .collect();
    let schema = event_schema();
    assert_eq!(columns.len(), schema.fields().len());
    for ((name, ty, not_null), field) in columns.iter().zip(schema.fields()) {
        assert_eq!(name, field.name());
        assert_eq!(ty, &bigquery_type(field.data_type()), "{name}");
        assert_eq!(*not_null, !field.is_nullable(), "{name} nullability");
    }
    assert!(ddl.contains("PARTITION BY date"));
}
