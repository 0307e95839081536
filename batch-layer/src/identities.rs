//! The warehouse's `identities`: one row per anonymous device the speed layer merged into a
//! person (`partner_id`, `anonymous_id`, `user_id`, `kind` = `merge`, `linked_at`), and one per
//! device an operator unlinked again (`kind` = `unlink`, `linked_at` the unlink's time), taken
//! from the records the archive keeps beside the events (`pulse_archive::identity_file`), with
//! the UTC day each was written (`date`, the partition) and its position in the events topic.
//! A report maps a device to its person when it has a merge row and no unlink row.
//!
//! Only merges and unlinks count: a link is a question the device's partition may refuse, a
//! refusal links nothing, and a merge is the device's answer, written once per device (the
//! first link stands). A merge the speed layer wrote again after a crash is a copy of the same
//! link, an unlink run twice writes two: each device is kept once per kind and day, the first
//! copy by position. (A copy written on another day makes a second row there, with the same
//! person: the reports that count people join through one row per device, `GROUP BY
//! partner_id, anonymous_id` with `MIN(user_id)` and no `unlink` row, exact since a device
//! merges into one person only and an unlinked device never merges again.)
//!
//! The BigQuery load and the embedded engine's view use the SQL text built here, as
//! `crate::dedupe` does for events, so both engines see the same rows.

use arrow_schema::{DataType, Field, Schema, TimeUnit};

/// The table (BigQuery) and view (embedded engine) name.
pub const TABLE: &str = "identities";

/// The columns of `identities`, as the archive's Arrow types (the BigQuery schema is derived
/// from it, see `warehouse::schema`).
pub fn identities_schema() -> Schema {
    let time = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Schema::new(vec![
        Field::new("partner_id", DataType::Utf8, false),
        Field::new("anonymous_id", DataType::Utf8, false),
        Field::new("user_id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("linked_at", time, false),
        Field::new("date", DataType::Date32, false),
        Field::new("kafka_partition", DataType::Int64, false),
        Field::new("kafka_offset", DataType::Int64, false),
    ])
}

/// The columns of `identities`, in order, comma separated and quoted.
pub fn columns() -> String {
    identities_schema()
        .fields()
        .iter()
        .map(|f| format!("`{}`", f.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `SELECT <columns>` of the merges and unlinks in `source` (rows of identity files), each
/// device once per kind and day, optionally of the day `date` only.
pub fn merges_of(source: &str, date: Option<chrono::NaiveDate>) -> String {
    let day = "CAST(`written_at` AS DATE)";
    let filter = date
        .map(|d| format!(" AND {day} = DATE '{d}'"))
        .unwrap_or_default();
    format!(
        "SELECT {} FROM (\
         SELECT `partner_id`, `anonymous_id`, `user_id`, `kind`, `linked_at`, {day} AS `date`, \
         `kafka_partition`, `kafka_offset`, ROW_NUMBER() OVER (\
         PARTITION BY {day}, `partner_id`, `anonymous_id`, `kind` \
         ORDER BY `kafka_partition` ASC, `kafka_offset` ASC) AS pulse_copy \
         FROM {source} WHERE `kind` IN ('merge', 'unlink'){filter}) AS ranked \
         WHERE pulse_copy = 1",
        columns()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_and_unlinks_once_per_device_and_day() {
        let d = chrono::NaiveDate::from_ymd_opt(2026, 12, 7).unwrap();
        let sql = merges_of("`p.d.identities__load`", Some(d));
        assert!(
            sql.contains(
                "WHERE `kind` IN ('merge', 'unlink') AND CAST(`written_at` AS DATE) = DATE '2026-12-07'"
            ),
            "{sql}"
        );
        assert!(sql.contains(
            "PARTITION BY CAST(`written_at` AS DATE), `partner_id`, `anonymous_id`, `kind`"
        ));
        for f in identities_schema().fields() {
            assert!(sql.contains(&format!("`{}`", f.name())), "{}", f.name());
        }
        assert!(!merges_of("t", None).contains("DATE '"));
    }
}
