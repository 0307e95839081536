//! The warehouse DDL matches the Arrow schema of the archive, column for column.

use pulse_batch::warehouse::schema::{ddl_type, table_schema, PARTITION_COLUMN};
use pulse_core::schema::event_schema;

#[test]
fn ddl_columns_match_the_arrow_schema() {
    check_ddl(
        include_str!("../../warehouse-sql/ddl/events.sql"),
        "events",
        &event_schema(),
    );
    check_ddl(
        include_str!("../../warehouse-sql/ddl/identities.sql"),
        "identities",
        &pulse_batch::identities::identities_schema(),
    );
}

fn check_ddl(ddl: &str, table: &str, schema: &arrow_schema::Schema) {
    let body = ddl
        .split_once(&format!("{table} ("))
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
    assert_eq!(columns.len(), schema.fields().len(), "{table}");
    for ((name, ty, not_null), field) in columns.iter().zip(schema.fields()) {
        assert_eq!(name, field.name(), "{table}");
        assert_eq!(Some(ty.clone()), ddl_type(field.data_type()), "{name}");
        assert_eq!(*not_null, !field.is_nullable(), "{name} nullability");
    }
    assert!(ddl.contains(&format!("PARTITION BY {PARTITION_COLUMN}")));
}

/// The table the loader creates has the archive's columns, in order, with modes that match
/// their nullability (the DDL is checked against the same Arrow schema above).
#[test]
fn loader_schema_matches_the_arrow_schema() {
    let schema = table_schema();
    let fields = schema.fields().as_ref().unwrap();
    let arrow = event_schema();
    assert_eq!(fields.len(), arrow.fields().len());
    for (bq, a) in fields.iter().zip(arrow.fields()) {
        assert_eq!(&bq.name, a.name());
        let mode = bq.mode.as_deref().unwrap();
        let repeated = matches!(a.data_type(), arrow_schema::DataType::List(_));
        let want = if repeated {
            "REPEATED"
        } else if a.is_nullable() {
            "NULLABLE"
        } else {
            "REQUIRED"
        };
        assert_eq!(mode, want, "{}", a.name());
    }
}
