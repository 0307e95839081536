//! Loading one day of the archive into its BigQuery partition, idempotently.
//!
//! Only committed files (covered by a progress marker, see [`crate::layout`]) are loaded, named
//! one by one: a wildcard would also pick up a file the archiver is writing right now. The
//! files go into a staging table first; partition D is then replaced by the staging rows of D
//! with each `(partner_id, message_id)` once ([`crate::dedupe`]: a client retry counts once in
//! every report), in one multi-statement transaction: `DELETE` partition D, `INSERT` the
//! deduplicated staging rows of D. BigQuery applies it atomically and touches no other
//! partition, so re-running a day after late data arrived is safe.
//!
//! Why not a load or query job into the partition decorator `events$YYYYMMDD` with
//! WRITE_TRUNCATE: a load job cannot deduplicate, and a query job's result columns are all
//! NULLABLE, which BigQuery refuses to write over the table's REQUIRED columns. The
//! transaction is also what the local emulator runs, so the production path is the tested one.
//!
//! The day's identity files (the speed layer's merges, by the day they were written) replace
//! partition D of the `identities` table the same way: staged, then one transaction that
//! keeps each device once ([`crate::identities`]).
//!
//! Erased people's rows (`pulse_core::erasure`) are deleted from both staging tables before the
//! replace, their ids passed as one query parameter (in a statement of its own: parameters
//! and multi-statement scripts do not mix everywhere): an archive file is rewritten without
//! them only when `pulse-admin users erase` gets to it, and a load that read a file before
//! the rewrite must not put them back after the erasure's `DELETE`.

use chrono::NaiveDate;
use object_store::ObjectStore;
use pulse_core::erasure::Erasures;
use pulse_core::event::partition_key;
use serde_json::{json, Value};

use super::client::{Warehouse, WarehouseError};
use super::schema::{identity_file_table_schema, table_schema, PARTITION_COLUMN};
use crate::layout;

/// A load job takes at most 10,000 source URIs.
pub const MAX_URIS_PER_JOB: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
    #[error("listing the archive: {0}")]
    Store(#[from] object_store::Error),
    #[error(
        "BigQuery reads the archive from Cloud Storage: give --source-uri gs://bucket/prefix \
         (or an --archive-url that is gs://…); got {0:?}"
    )]
    SourceUri(String),
}

/// What loading one day did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    pub date: NaiveDate,
    pub files: usize,
    /// Rows of the day's archive files (BigQuery's `outputRows` of the staging loads).
    pub archived_rows: u64,
    /// Rows partition D holds now: one per `(partner_id, message_id)`.
    pub rows: u64,
    /// Archived rows that were client retries of a row kept (`archived_rows - rows`).
    pub duplicates: u64,
    /// The day's identity files, and the devices partition D of `identities` holds now.
    pub identity_files: usize,
    pub identities: u64,
    /// Rows of erased people left out (events and identities): in files the erasure has not
    /// rewritten yet.
    pub erased: u64,
    pub jobs: Vec<String>,
}

/// The gs:// prefix BigQuery reads the archive under: `--source-uri`, else the archive URL
/// itself when it is on Cloud Storage.
pub fn source_prefix(source_uri: Option<&str>, archive_url: &str) -> Result<String, LoadError> {
    let prefix = source_uri.unwrap_or(archive_url);
    if prefix.starts_with("gs://") && prefix.len() > "gs://".len() {
        Ok(prefix.trim_end_matches('/').to_string())
    } else {
        Err(LoadError::SourceUri(prefix.to_string()))
    }
}

/// The staging table of one load of `date`: named for the day and for this load alone. Two
/// loads of one day at once (a nightly `--since` and a re-run for late data, say) would
/// otherwise share it, and with more than one job per day (a day of 100 partitions holds
/// more than 10,000 files) one load's truncating first job or final drop would cut the
/// other's staging rows, and its replace would write a partial day.
fn staging_table(table: &str, date: NaiveDate) -> String {
    let load = uuid::Uuid::new_v4().simple().to_string();
    format!("{table}__load_{}_{}", date.format("%Y%m%d"), &load[..12])
}

/// The `configuration` of a Parquet load job of event files.
pub fn load_configuration(
    destination: Value,
    uris: &[String],
    truncate: bool,
    create: bool,
) -> Value {
    load_configuration_of(destination, uris, truncate, create, table_schema())
}

fn load_configuration_of(
    destination: Value,
    uris: &[String],
    truncate: bool,
    create: bool,
    schema: gcp_bigquery_client::model::table_schema::TableSchema,
) -> Value {
    json!({"load": {
        "sourceUris": uris,
        "sourceFormat": "PARQUET",
        // Parquet LIST columns (category) load as ARRAY<STRING>, not as a nested RECORD.
        "parquetOptions": {"enableListInference": true},
        "destinationTable": destination,
        "schema": schema,
        "writeDisposition": if truncate { "WRITE_TRUNCATE" } else { "WRITE_APPEND" },
        "createDisposition": if create { "CREATE_IF_NEEDED" } else { "CREATE_NEVER" },
    }})
}

/// Loads the committed archive files of `date` into partition `date`, replacing it.
pub async fn load_day(
    wh: &Warehouse,
    store: &dyn ObjectStore,
    source_prefix: &str,
    date: NaiveDate,
    files_per_job: usize,
    erased: &Erasures,
) -> Result<LoadReport, LoadError> {
    let erased = ErasedFilter::of(erased);
    let uris: Vec<String> = layout::committed_files(store, Some(date))
        .await?
        .into_iter()
        .map(|f| format!("{source_prefix}/{}", f.path))
        .collect();
    let identity_uris: Vec<String> = layout::committed_identity_files(store, Some(date))
        .await?
        .into_iter()
        .map(|f| format!("{source_prefix}/{}", f.path))
        .collect();
    let mut report = LoadReport {
        date,
        files: uris.len(),
        archived_rows: 0,
        rows: 0,
        duplicates: 0,
        identity_files: identity_uris.len(),
        identities: 0,
        erased: 0,
        jobs: Vec::new(),
    };
    if uris.is_empty() {
        // No events archived for the day: leave whatever the partition holds rather than
        // truncating it on the strength of an empty listing (merges written that day still
        // load: a device's merge is about its person's events on any day).
        tracing::warn!(%date, "no committed archive files for this day; partition left as is");
        if identity_uris.is_empty() {
            return Ok(report);
        }
    } else {
        let staging = staging_table(&wh.table, date);
        let chunks: Vec<&[String]> = uris
            .chunks(files_per_job.clamp(1, MAX_URIS_PER_JOB))
            .collect();
        let written = write_partition(wh, &chunks, &staging, date, &erased, &mut report).await;
        // Also after a failure: a staging table left behind costs storage and confuses.
        if let Err(e) = wh.drop_table(&staging).await {
            tracing::warn!(error = %e, table = %staging, "dropping the staging table failed");
        }
        written?;
    }
    load_identities(
        wh,
        &identity_uris,
        date,
        files_per_job,
        &erased,
        &mut report,
    )
    .await?;
    tracing::info!(%date, files = report.files, archived_rows = report.archived_rows,
        rows = report.rows, duplicates = report.duplicates, identities = report.identities,
        "day loaded");
    Ok(report)
}

/// Partition D of `identities` becomes the devices merged on day D: the day's identity files
/// staged, then one transaction (with none that day the partition is only emptied).
async fn load_identities(
    wh: &Warehouse,
    uris: &[String],
    date: NaiveDate,
    files_per_job: usize,
    erased: &ErasedFilter,
    report: &mut LoadReport,
) -> Result<(), WarehouseError> {
    let staging = staging_table(&wh.identities, date);
    let written = replace_identities(wh, uris, &staging, date, files_per_job, erased, report).await;
    if !uris.is_empty() {
        if let Err(e) = wh.drop_table(&staging).await {
            tracing::warn!(error = %e, table = %staging, "dropping the staging table failed");
        }
    }
    written
}

async fn replace_identities(
    wh: &Warehouse,
    uris: &[String],
    staging: &str,
    date: NaiveDate,
    files_per_job: usize,
    erased: &ErasedFilter,
    report: &mut LoadReport,
) -> Result<(), WarehouseError> {
    let table = qualified(wh, &wh.identities);
    let mut insert = String::new();
    if !uris.is_empty() {
        let chunks = uris.chunks(files_per_job.clamp(1, MAX_URIS_PER_JOB));
        for (i, chunk) in chunks.enumerate() {
            let destination = wh.table_ref(staging);
            let schema = identity_file_table_schema();
            let config = load_configuration_of(destination, chunk, i == 0, true, schema);
            let (job_id, _) = wh.run_job("load_identities", config).await?;
            report.jobs.push(job_id);
        }
        let select = crate::identities::merges_of(&qualified(wh, staging), Some(date));
        let columns = crate::identities::columns();
        report.erased += erased
            .purge(
                wh,
                &qualified(wh, staging),
                &["`user_id`", "`anonymous_id`"],
            )
            .await?;
        insert = format!("INSERT INTO {table} ({columns}) {select}; ");
    }
    let day = day_filter(date);
    let script =
        format!("BEGIN TRANSACTION; DELETE FROM {table} WHERE {day}; {insert}COMMIT TRANSACTION;");
    let configuration = json!({"query": {"query": script, "useLegacySql": false}});
    let (job_id, _) = wh.run_job("replace_identities", configuration).await?;
    report.jobs.push(job_id);
    report.identities = count_rows(wh, &wh.identities, date).await?;
    Ok(())
}

/// The staging load job(s), then the deduplicated replace of partition D.
async fn write_partition(
    wh: &Warehouse,
    chunks: &[&[String]],
    staging: &str,
    date: NaiveDate,
    erased: &ErasedFilter,
    report: &mut LoadReport,
) -> Result<(), WarehouseError> {
    for (i, chunk) in chunks.iter().enumerate() {
        let config = load_configuration(wh.table_ref(staging), chunk, i == 0, true);
        let (job_id, job) = wh.run_job("load", config).await?;
        report.archived_rows += job
            .statistics
            .and_then(|s| s.load)
            .and_then(|l| l.output_rows)
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap_or(0);
        report.jobs.push(job_id);
    }
    report.erased += erased
        .purge(
            wh,
            &qualified(wh, staging),
            &["COALESCE(`user_id`, `anonymous_id`)"],
        )
        .await?;
    let configuration = json!({"query": {
        "query": replace_script(wh, staging, date),
        "useLegacySql": false,
    }});
    let (job_id, _) = wh.run_job("replace", configuration).await?;
    report.jobs.push(job_id);
    report.rows = count_rows(wh, &wh.table, date).await?;
    report.duplicates = report.archived_rows.saturating_sub(report.rows);
    Ok(())
}

fn qualified(wh: &Warehouse, table: &str) -> String {
    format!("`{}.{}.{}`", wh.project, wh.dataset, table)
}

fn day_filter(date: NaiveDate) -> String {
    format!("`{PARTITION_COLUMN}` = DATE '{date}'")
}

/// One transaction: partition D of the table becomes exactly the deduplicated staging rows of D.
fn replace_script(wh: &Warehouse, staging: &str, date: NaiveDate) -> String {
    let table = qualified(wh, &wh.table);
    let day = day_filter(date);
    let select = crate::dedupe::first_of_each_message(&qualified(wh, staging), Some(&day));
    // Columns named: the insert must not depend on the order the table happens to have.
    let columns = crate::dedupe::columns();
    format!(
        "BEGIN TRANSACTION; \
         DELETE FROM {table} WHERE {day}; \
         INSERT INTO {table} ({columns}) {select}; \
         COMMIT TRANSACTION;"
    )
}

/// The erased people a load leaves out: their profile ids (`{partner}:{id}`), the query
/// parameter `@erased` of one `DELETE` per staging table.
struct ErasedFilter {
    profile_ids: Vec<String>,
}

impl ErasedFilter {
    fn of(erasures: &Erasures) -> Self {
        let mut profile_ids: Vec<String> = erasures
            .by_partner()
            .flat_map(|(partner, ids)| ids.into_iter().map(move |id| partition_key(partner, id)))
            .collect();
        profile_ids.sort();
        Self { profile_ids }
    }

    /// Deletes from the staging table `staging` the rows whose person (any of the SQL
    /// expressions `ids`) is erased; how many. Nothing to do when nobody is.
    async fn purge(
        &self,
        wh: &Warehouse,
        staging: &str,
        ids: &[&str],
    ) -> Result<u64, WarehouseError> {
        if self.profile_ids.is_empty() {
            return Ok(0);
        }
        let filter: Vec<String> = ids
            .iter()
            .map(|id| format!("CONCAT(`partner_id`, ':', {id}) IN UNNEST(@erased)"))
            .collect();
        let erased = self.profile_ids.iter().map(String::as_str);
        let params = json!([super::string_array_parameter("erased", erased)]);
        super::erase::delete_where(wh, staging, &filter.join(" OR "), &params, false).await
    }
}

/// Rows partition D of `table` holds.
async fn count_rows(wh: &Warehouse, table: &str, date: NaiveDate) -> Result<u64, WarehouseError> {
    let sql = format!(
        "SELECT COUNT(*) AS n FROM {} WHERE {}",
        qualified(wh, table),
        day_filter(date)
    );
    let batches = wh.query(&sql).await?;
    let n = super::client::results::count_of(&batches);
    n.ok_or_else(|| WarehouseError::Api {
        what: format!("row count of partition {date}"),
        message: "the query returned no number".into(),
    })
}

/// `--since N`: the N days up to and including `today`, oldest first.
pub fn last_days(today: NaiveDate, n: u32) -> Vec<NaiveDate> {
    (0..n)
        .rev()
        .filter_map(|back| today.checked_sub_days(chrono::Days::new(u64::from(back))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn staging_load_truncates_the_staging_table_and_lists_each_file() {
        let dest = json!({"projectId": "p", "datasetId": "d", "tableId": "events__load_20261121"});
        let uris = vec!["gs://b/events/dt=2026-11-21/part-000-1-2.parquet".to_string()];
        let c = load_configuration(dest, &uris, true, true);
        let load = &c["load"];
        assert_eq!(load["destinationTable"]["tableId"], "events__load_20261121");
        assert_eq!(load["writeDisposition"], "WRITE_TRUNCATE");
        assert_eq!(load["createDisposition"], "CREATE_IF_NEEDED");
        assert_eq!(load["sourceFormat"], "PARQUET");
        assert_eq!(load["parquetOptions"]["enableListInference"], true);
        assert_eq!(load["sourceUris"][0], uris[0]);
        let fields = load["schema"]["fields"].as_array().unwrap();
        assert!(fields
            .iter()
            .any(|f| f["name"] == "category" && f["mode"] == "REPEATED"));
    }

    #[test]
    fn each_load_of_a_day_has_a_staging_table_of_its_own() {
        let (a, b) = (
            staging_table("events", d("2026-11-21")),
            staging_table("events", d("2026-11-21")),
        );
        assert!(a.starts_with("events__load_20261121_"), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn since_counts_today() {
        assert_eq!(
            last_days(d("2026-11-22"), 3),
            vec![d("2026-11-20"), d("2026-11-21"), d("2026-11-22")]
        );
        assert!(last_days(d("2026-11-22"), 0).is_empty());
    }

    #[test]
    fn source_prefix_must_be_cloud_storage() {
        assert_eq!(
            source_prefix(None, "gs://b/archive/").unwrap(),
            "gs://b/archive"
        );
        assert_eq!(
            source_prefix(Some("gs://b"), ".run/archive").unwrap(),
            "gs://b"
        );
        let err = source_prefix(None, ".run/archive").unwrap_err().to_string();
        assert!(err.contains("--source-uri"), "{err}");
        assert!(source_prefix(Some("gs://"), "x").is_err());
    }
}
