//! The BigQuery side of the batch layer: the day-partitioned `events` table, daily loads from
//! the Parquet archive, and BI SQL run on BigQuery.
//!
//! - [`schema`]: the table schema, derived from the archive's Arrow schema.
//! - [`auth`]: Google credentials (ADC, service-account key, none for an emulator).
//! - [`client`]: [`Warehouse`]: dataset and table provisioning, jobs, queries.
//! - [`load`]: loading one day of committed archive files into its partition.
//! - [`erase`]: deleting erased people's rows (`pulse-admin users erase`).

pub mod auth;
pub mod client;
pub mod erase;
pub mod load;
pub mod schema;

use std::path::PathBuf;

pub use auth::AuthMode;
pub use client::{Warehouse, WarehouseError};
pub use load::LoadReport;

/// A named query parameter (BigQuery's REST form) holding an array of strings: how a list of
/// ids reaches SQL without ever being SQL text.
pub(crate) fn string_array_parameter<'a>(
    name: &str,
    values: impl IntoIterator<Item = &'a str>,
) -> serde_json::Value {
    let values: Vec<serde_json::Value> = values
        .into_iter()
        .map(|v| serde_json::json!({"value": v}))
        .collect();
    serde_json::json!({
        "name": name,
        "parameterType": {"type": "ARRAY", "arrayType": {"type": "STRING"}},
        "parameterValue": {"arrayValues": values},
    })
}

/// Where the warehouse is and how to reach it. Every flag has a `PULSE_BQ_…` twin;
/// `deploy/local/stack env` points them at the local emulator.
#[derive(Debug, Clone, clap::Args)]
pub struct WarehouseArgs {
    /// Google Cloud project of the dataset (and billed for the jobs).
    #[arg(long = "bq-project", env = "PULSE_BQ_PROJECT")]
    pub project: Option<String>,
    #[arg(long = "bq-dataset", env = "PULSE_BQ_DATASET", default_value = "pulse")]
    pub dataset: String,
    #[arg(long = "bq-table", env = "PULSE_BQ_TABLE", default_value = "events")]
    pub table: String,
    /// The table of devices merged into people (see `pulse_batch::identities`), loaded with
    /// each day; the reports that count people join it by this name.
    #[arg(
        long = "bq-identities-table",
        env = "PULSE_BQ_IDENTITIES_TABLE",
        default_value = "identities"
    )]
    pub identities: String,
    /// Location of the dataset and of the jobs.
    #[arg(long = "bq-location", env = "PULSE_BQ_LOCATION", default_value = "US")]
    pub location: String,
    /// BigQuery REST base URL (an emulator's, for local runs and tests).
    #[arg(
        long = "bq-api-url",
        env = "PULSE_BQ_API_URL",
        default_value = "https://bigquery.googleapis.com/bigquery/v2"
    )]
    pub api_url: String,
    #[arg(long = "bq-auth", env = "PULSE_BQ_AUTH", value_enum, default_value_t = AuthMode::Adc)]
    pub auth: AuthMode,
    /// Service-account key file, with `--bq-auth service-account`.
    #[arg(long = "bq-key-file", env = "PULSE_BQ_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Days BigQuery keeps a partition (the table's `partition_expiration_days`). Set: applied
    /// when the table is created and updated on an existing one. Unset: a new table keeps
    /// partitions forever, an existing table keeps its setting.
    #[arg(
        long = "partition-expiration-days",
        env = "PULSE_BQ_PARTITION_EXPIRATION_DAYS",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub partition_expiration_days: Option<u32>,
    /// Longest wait for one BigQuery job, seconds.
    #[arg(long = "bq-job-timeout-secs", env = "PULSE_BQ_JOB_TIMEOUT_SECS", default_value_t = 3600)]
    pub job_timeout_secs: u64,
}
