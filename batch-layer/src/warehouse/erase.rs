//! The warehouse side of an erasure (`pulse-admin users erase`, see `pulse_core::erasure`):
//! a DML `DELETE` of the person's rows from each day of `events` that held them, and from
//! `identities`. The ids travel as query parameters, never as SQL text: an id is whatever a
//! client sent.
//!
//! A day loaded again after the archive was rewritten loads the rewritten files (without the
//! rows); so the order an erasure runs in (archive first, then the warehouse) leaves no day
//! that a later load would bring the person back into.

use std::collections::{BTreeMap, BTreeSet};

use chrono::NaiveDate;
use serde_json::{json, Value};

use super::client::{Warehouse, WarehouseError};
use super::schema::PARTITION_COLUMN;

/// Rows deleted from each table.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Deleted {
    /// Per day of `events`.
    pub events: BTreeMap<NaiveDate, u64>,
    pub identities: u64,
}

/// Deletes the rows of `ids` (by partner) from the `days` of `events`, and from
/// `identities`. With `dry_run`, counts them instead.
pub async fn erase(
    wh: &Warehouse,
    ids: &BTreeMap<String, BTreeSet<String>>,
    days: &BTreeSet<NaiveDate>,
    dry_run: bool,
) -> Result<Deleted, WarehouseError> {
    let mut out = Deleted::default();
    let events = format!("`{}.{}.{}`", wh.project, wh.dataset, wh.table);
    let identities = format!("`{}.{}.{}`", wh.project, wh.dataset, wh.identities);
    for (partner, ids) in ids {
        let params = parameters(partner, ids);
        for day in days {
            // A person's row: its person id (user id, else anonymous id) is erased.
            let filter = format!(
                "`{PARTITION_COLUMN}` = DATE '{day}' AND partner_id = @partner \
                 AND COALESCE(user_id, anonymous_id) IN UNNEST(@ids)"
            );
            let n = delete_where(wh, &events, &filter, &params, dry_run).await?;
            *out.events.entry(*day).or_default() += n;
        }
        let filter =
            "partner_id = @partner AND (user_id IN UNNEST(@ids) OR anonymous_id IN UNNEST(@ids))";
        out.identities += delete_where(wh, &identities, filter, &params, dry_run).await?;
    }
    Ok(out)
}

/// `@partner` and `@ids`.
fn parameters(partner: &str, ids: &BTreeSet<String>) -> Value {
    json!([
        {"name": "partner", "parameterType": {"type": "STRING"}, "parameterValue": {"value": partner}},
        super::string_array_parameter("ids", ids.iter().map(String::as_str)),
    ])
}

/// Deletes (or counts) the rows of `table` that `filter` selects, with the named query
/// parameters `params`; how many.
pub(crate) async fn delete_where(
    wh: &Warehouse,
    table: &str,
    filter: &str,
    params: &Value,
    dry_run: bool,
) -> Result<u64, WarehouseError> {
    let sql = match dry_run {
        true => format!("SELECT COUNT(*) AS n FROM {table} WHERE {filter}"),
        false => format!("DELETE FROM {table} WHERE {filter}"),
    };
    let configuration = json!({"query": {
        "query": sql,
        "useLegacySql": false,
        "parameterMode": "NAMED",
        "queryParameters": params,
    }});
    let (job_id, job) = wh.run_job("erase", configuration).await?;
    if dry_run {
        return wh.single_count(&job_id).await;
    }
    let affected = job
        .statistics
        .and_then(|s| s.query)
        .and_then(|q| q.num_dml_affected_rows)
        .and_then(|n| n.parse().ok());
    Ok(affected.unwrap_or_default())
}
