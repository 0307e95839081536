//! [`Warehouse`]: the BigQuery dataset and `events` table, and the jobs run against them,
//! split by role: [`provision`] (dataset and table), [`jobs`] (insert, retry, wait) and
//! [`results`] (query rows as Arrow batches).
//!
//! Datasets, tables, job status and query results go through `gcp-bigquery-client`. Jobs are
//! inserted with a plain JSON body instead, because the crate's load-job model has no
//! `parquetOptions`, and without `enableListInference` BigQuery loads a Parquet list column
//! as a nested RECORD instead of the table's `ARRAY<STRING>`.

use std::sync::Arc;
use std::time::Duration;

use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::client_builder::ClientBuilder;
use gcp_bigquery_client::error::BQError;
use serde_json::{json, Value};

use super::auth::{authenticator, AuthError};
use super::WarehouseArgs;

mod jobs;
mod provision;
pub(crate) mod results;

const DAY_MS: u64 = 24 * 3600 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum WarehouseError {
    #[error("--bq-project (PULSE_BQ_PROJECT) is required for BigQuery")]
    MissingProject,
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("BigQuery {what}: {message}")]
    Api { what: String, message: String },
    #[error("BigQuery job {job_id} failed: {message}")]
    JobFailed { job_id: String, message: String },
    #[error("BigQuery job {job_id} still running after {secs}s (--bq-job-timeout-secs)")]
    Timeout { job_id: String, secs: u64 },
    #[error("BigQuery result: {0}")]
    Result(#[from] arrow::error::ArrowError),
}

/// BigQuery's own message for a failed call ("Not found: Dataset p:d", …), not a debug dump.
fn api_error(what: impl Into<String>, e: BQError) -> WarehouseError {
    let message = match e {
        BQError::ResponseError { error } => {
            format!("{} ({})", error.error.message, error.error.code)
        }
        other => other.to_string(),
    };
    WarehouseError::Api {
        what: what.into(),
        message,
    }
}

fn http_status(e: &BQError) -> Option<i64> {
    match e {
        BQError::ResponseError { error } => Some(error.error.code),
        _ => None,
    }
}

pub struct Warehouse {
    client: gcp_bigquery_client::Client,
    http: reqwest::Client,
    auth: Arc<dyn Authenticator>,
    api_url: String,
    pub project: String,
    pub dataset: String,
    pub table: String,
    pub identities: String,
    pub location: String,
    partition_expiration_days: Option<u32>,
    job_timeout: Duration,
}

impl Warehouse {
    pub async fn connect(args: &WarehouseArgs) -> Result<Self, WarehouseError> {
        let project = args.project.clone().ok_or(WarehouseError::MissingProject)?;
        let auth = authenticator(args.auth, args.key_file.as_ref()).await?;
        let api_url = args.api_url.trim_end_matches('/').to_string();
        // Bounded requests: a hung connection must not outlive --bq-job-timeout-secs.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| WarehouseError::Api {
                what: "HTTP client".into(),
                message: e.to_string(),
            })?;
        let client = ClientBuilder::new()
            .with_v2_base_url(api_url.clone())
            .with_client(http.clone())
            .build_from_authenticator(auth.clone())
            .await
            .map_err(|e| api_error("client", e))?;
        Ok(Self {
            client,
            http,
            auth,
            api_url,
            project,
            dataset: args.dataset.clone(),
            table: args.table.clone(),
            identities: args.identities.clone(),
            location: args.location.clone(),
            partition_expiration_days: args.partition_expiration_days,
            job_timeout: Duration::from_secs(args.job_timeout_secs),
        })
    }

    /// `{"projectId", "datasetId", "tableId"}` of a table of the dataset.
    pub fn table_ref(&self, table_id: &str) -> Value {
        json!({"projectId": self.project, "datasetId": self.dataset, "tableId": table_id})
    }
}
