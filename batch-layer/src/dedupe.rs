//! The one rule every warehouse reader applies: each `(partner_id, message_id)` of a day counts
//! once, the first received: ARCHITECTURE.md's dedupe key. (The speed layer scopes by partner,
//! user and id, because a profile is all it can see; a retry always carries its user, so both
//! agree on every real retry. Only two *different* users of one partner sending one id differ:
//! two profile events, one warehouse row.)
//!
//! The archive stays the raw log, exactly what Kafka holds, client retries included: it is the
//! master dataset, and dropping rows there would make it disagree with the topic. Readers see
//! the deduplicated events instead: the BigQuery load writes the deduplicated day, and the
//! embedded engine's `events` table is a view over the raw files. Both use the SQL text built
//! here, which runs on BigQuery, DataFusion and DuckDB alike.
//!
//! The scope is one day partition (`date`, the UTC day of the event's `timestamp`): a retry
//! carries the client's timestamp, so it lands on the same day. (An event sent without a
//! timestamp gets ingest's receive time, so a retry of it across midnight UTC lands on the
//! next day and counts there.)

use pulse_core::schema::event_schema;

/// The columns of the archive, in order, comma separated.
pub fn columns() -> String {
    event_schema()
        .fields()
        .iter()
        .map(|f| format!("`{}`", f.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The dedupe key: one row per day, partner and message id.
pub const KEY: [&str; 3] = ["date", "partner_id", "message_id"];

/// The order in which copies of a key rank, all ascending with NULLs first (as BigQuery sorts
/// by default): the first received wins. The columns after `received_at` break ties, so every
/// engine keeps the same row: ingest stamps one receive time per request, and a client could
/// send two different events with one id in it. (A producer retry writes the same record
/// twice: identical rows bar their offsets, and the first offset is kept.) Last comes the
/// record's position, unique, so the kept row never depends on the engine.
pub const ORDER: [&str; 10] = [
    "received_at",
    "timestamp",
    "event",
    "product_id",
    "cart_amount",
    "session_id",
    "current_url",
    "search_query",
    "kafka_partition",
    "kafka_offset",
];

/// `SELECT <columns> FROM <source> [WHERE <filter>]`, keeping the first received row of
/// each `(date, partner_id, message_id)`.
pub fn first_of_each_message(source: &str, filter: Option<&str>) -> String {
    let columns = columns();
    let filter = filter.map(|f| format!(" WHERE {f}")).unwrap_or_default();
    let quoted = |c: &&str| format!("`{c}`");
    let key: Vec<String> = KEY.iter().map(quoted).collect();
    let order: Vec<String> = ORDER
        .iter()
        .map(|c| format!("{} ASC NULLS FIRST", quoted(c)))
        .collect();
    format!(
        "SELECT {columns} FROM (\
         SELECT *, ROW_NUMBER() OVER (\
         PARTITION BY {} \
         ORDER BY {}) AS pulse_copy \
         FROM {source}{filter}) AS ranked WHERE pulse_copy = 1",
        key.join(", "),
        order.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_every_column_and_the_scope() {
        let sql = first_of_each_message(
            "`p.d.events__load_20261121`",
            Some("`date` = DATE '2026-11-21'"),
        );
        for f in event_schema().fields() {
            assert!(sql.contains(&format!("`{}`", f.name())), "{}", f.name());
        }
        assert!(sql.contains("PARTITION BY `date`, `partner_id`, `message_id`"));
        assert!(sql.contains("WHERE `date` = DATE '2026-11-21'"));
        assert!(
            !sql.contains("pulse_copy,"),
            "the rank is not selected: {sql}"
        );
    }
}
