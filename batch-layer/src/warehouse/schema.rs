//! The BigQuery table schema, derived from the archive's Arrow schema so the two cannot drift:
//! the loader creates the table from it, adds the columns an older table lacks, and a test
//! checks `warehouse-sql/ddl/events.sql` against it.

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
    let (ty, _) =
        scalar(item).unwrap_or_else(|| panic!("archive column {} has no BigQuery type", f.name()));
    let mut out = TableFieldSchema::new(f.name(), ty);
    out.mode = Some(mode.to_string());
    out
}

/// The `events` table schema for the REST API.
pub fn table_schema() -> TableSchema {
    schema_of(&event_schema())
}

/// The `identities` table schema for the REST API (see [`crate::identities`]).
pub fn identities_table_schema() -> TableSchema {
    schema_of(&crate::identities::identities_schema())
}

/// The staging table of an identities load: an identity file's columns.
pub fn identity_file_table_schema() -> TableSchema {
    schema_of(&crate::identity_file::identity_schema())
}

fn schema_of(schema: &arrow_schema::Schema) -> TableSchema {
    TableSchema::new(schema.fields().iter().map(|f| field(f)).collect())
}

/// The archive's columns an existing table lacks, in the archive's order (a table created
/// by an older release, before a column was added to the event).
pub fn missing_columns(existing: &TableSchema) -> Vec<Field> {
    let have: std::collections::HashSet<&str> = existing
        .fields()
        .iter()
        .flatten()
        .map(|f| f.name.as_str())
        .collect();
    event_schema()
        .fields()
        .iter()
        .filter(|f| !have.contains(f.name().as_str()))
        .map(|f| f.as_ref().clone())
        .collect()
}

/// The DDL statements that add `columns` to `table` (a qualified, quoted name), one per
/// column (the emulator's engine takes one ALTER action per statement), or why they cannot:
/// BigQuery adds only NULLABLE and REPEATED columns to a table with rows. `IF NOT EXISTS`,
/// so that two loaders racing, a retried job or a run stopped halfway are harmless.
pub fn add_columns_ddl(table: &str, columns: &[Field]) -> Result<Vec<String>, String> {
    let mut statements = Vec::with_capacity(columns.len());
    for c in columns {
        if !c.is_nullable() && !matches!(c.data_type(), DataType::List(_)) {
            return Err(format!(
                "the table lacks column `{}`, which is REQUIRED: BigQuery cannot add a \
                 REQUIRED column to an existing table; recreate the table",
                c.name()
            ));
        }
        let ty = ddl_type(c.data_type())
            .ok_or_else(|| format!("column `{}` has no BigQuery type", c.name()))?;
        statements.push(format!(
            "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS `{}` {ty}",
            c.name()
        ));
    }
    Ok(statements)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table an older release created: every column but the archive's positions.
    fn older_table() -> TableSchema {
        let mut fields = table_schema().fields().clone().unwrap();
        fields.retain(|f| f.name != "kafka_partition" && f.name != "kafka_offset");
        TableSchema::new(fields)
    }

    #[test]
    fn an_older_table_gets_the_columns_it_lacks_one_statement_each() {
        let missing = missing_columns(&older_table());
        let names: Vec<&str> = missing.iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["kafka_partition", "kafka_offset"]);
        assert_eq!(
            add_columns_ddl("`p.d.events`", &missing).unwrap(),
            [
                "ALTER TABLE `p.d.events` ADD COLUMN IF NOT EXISTS `kafka_partition` INT64",
                "ALTER TABLE `p.d.events` ADD COLUMN IF NOT EXISTS `kafka_offset` INT64"
            ]
        );
        assert!(missing_columns(&table_schema()).is_empty());
    }

    #[test]
    fn a_missing_required_column_is_refused_by_name_and_lists_are_added() {
        let mut fields = table_schema().fields().clone().unwrap();
        fields.retain(|f| f.name != "date" && f.name != "category");
        let missing = missing_columns(&TableSchema::new(fields));
        let err = add_columns_ddl("`p.d.events`", &missing).unwrap_err();
        assert!(err.contains("`date`") && err.contains("REQUIRED"), "{err}");
        let category: Vec<Field> = missing
            .into_iter()
            .filter(|f| f.name() == "category")
            .collect();
        assert_eq!(
            add_columns_ddl("`t`", &category).unwrap(),
            ["ALTER TABLE `t` ADD COLUMN IF NOT EXISTS `category` ARRAY<STRING>"]
        );
    }

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
        let identities = identities_table_schema();
        let fields = identities.fields().as_ref().unwrap();
        assert!(fields
            .iter()
            .any(|f| f.name == PARTITION_COLUMN && f.mode.as_deref() == Some("REQUIRED")));
        let staging = identity_file_table_schema();
        assert_eq!(
            staging.fields().as_ref().unwrap().len(),
            crate::identity_file::identity_schema().fields().len()
        );
    }
}
