//! [`Warehouse`]: the BigQuery dataset and `events` table, and the jobs run against them.
//!
//! Datasets, tables, job status and query results go through `gcp-bigquery-client`. Jobs are
//! inserted with a plain JSON body instead, because the crate's load-job model has no
//! `parquetOptions`, and without `enableListInference` BigQuery loads a Parquet list column
//! as a nested RECORD instead of the table's `ARRAY<STRING>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, StringArray};
use arrow::record_batch::RecordBatch;
use arrow_schema::{DataType, Field, Schema};
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::client_builder::ClientBuilder;
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::model::dataset::Dataset;
use gcp_bigquery_client::model::get_query_results_parameters::GetQueryResultsParameters;
use gcp_bigquery_client::model::job::Job;
use gcp_bigquery_client::model::table::Table;
use gcp_bigquery_client::model::time_partitioning::TimePartitioning;
use pulse_service::{RetryPolicy, Shutdown};
use serde_json::{json, Value};

use super::auth::{authenticator, AuthError};
use super::schema::{table_schema, PARTITION_COLUMN};
use super::WarehouseArgs;

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
            location: args.location.clone(),
            partition_expiration_days: args.partition_expiration_days,
            job_timeout: Duration::from_secs(args.job_timeout_secs),
        })
    }

    /// `{"projectId", "datasetId", "tableId"}` of a table of the dataset.
    pub fn table_ref(&self, table_id: &str) -> Value {
        json!({"projectId": self.project, "datasetId": self.dataset, "tableId": table_id})
    }

    /// Creates the dataset and the day-partitioned table when missing, and brings the
    /// partition expiration of an existing table to the configured one. Idempotent, and safe
    /// when two loaders race (a 409 from the loser counts as success).
    pub async fn ensure_table(&self) -> Result<(), WarehouseError> {
        let datasets = self.client.dataset();
        match datasets.get(&self.project, &self.dataset).await {
            Ok(existing) => {
                let location = existing.location.unwrap_or_default();
                if !location.eq_ignore_ascii_case(&self.location) {
                    return Err(WarehouseError::Api {
                        what: format!("dataset {}", self.dataset),
                        message: format!(
                            "it is in location {location}, not {} (--bq-location)",
                            self.location
                        ),
                    });
                }
            }
            Err(e) if http_status(&e) == Some(404) => {
                let ds = Dataset::new(&self.project, &self.dataset).location(&self.location);
                match datasets.create(ds).await {
                    Ok(_) => tracing::info!(dataset = %self.dataset, "dataset created"),
                    Err(e) if http_status(&e) == Some(409) => {}
                    Err(e) => {
                        return Err(api_error(format!("creating dataset {}", self.dataset), e))
                    }
                }
            }
            Err(e) => return Err(api_error(format!("dataset {}", self.dataset), e)),
        }
        let partitioning = TimePartitioning {
            expiration_ms: self
                .partition_expiration_days
                .map(|d| (u64::from(d) * DAY_MS).to_string()),
            field: Some(PARTITION_COLUMN.to_string()),
            require_partition_filter: None,
            r#type: "DAY".to_string(),
        };
        let tables = self.client.table();
        match tables
            .get(&self.project, &self.dataset, &self.table, None)
            .await
        {
            Ok(existing) => {
                let current = existing.time_partitioning.clone().unwrap_or_default();
                if current.r#type != "DAY" || current.field.as_deref() != Some(PARTITION_COLUMN) {
                    return Err(WarehouseError::Api {
                        what: format!("table {}", self.table),
                        message: format!(
                            "it exists but is not partitioned by day on `{PARTITION_COLUMN}` \
                             ({current:?}); day loads need that"
                        ),
                    });
                }
                if self.partition_expiration_days.is_some()
                    && current.expiration_ms != partitioning.expiration_ms
                {
                    // Only the partitioning: sending the whole table back could drop column
                    // settings the client library does not model.
                    let patch = Table {
                        table_reference: existing.table_reference.clone(),
                        time_partitioning: Some(TimePartitioning {
                            expiration_ms: partitioning.expiration_ms.clone(),
                            ..current
                        }),
                        ..Default::default()
                    };
                    tables
                        .patch(&self.project, &self.dataset, &self.table, patch)
                        .await
                        .map_err(|e| api_error("updating partition expiration", e))?;
                    tracing::info!(days = ?self.partition_expiration_days, "partition expiration updated");
                }
                Ok(())
            }
            Err(e) if http_status(&e) == Some(404) => {
                let table = Table::new(&self.project, &self.dataset, &self.table, table_schema())
                    .description("Pulse clickstream events, loaded daily from the Parquet archive")
                    .time_partitioning(partitioning);
                match tables.create(table).await {
                    Ok(_) => {
                        tracing::info!(table = %self.table, "table created");
                        Ok(())
                    }
                    Err(e) if http_status(&e) == Some(409) => Ok(()),
                    Err(e) => Err(api_error(format!("creating table {}", self.table), e)),
                }
            }
            Err(e) => Err(api_error(format!("table {}", self.table), e)),
        }
    }

    /// Inserts a job with this configuration and waits until it is done; returns its id and
    /// its final state.
    pub async fn run_job(
        &self,
        kind: &str,
        configuration: Value,
    ) -> Result<(String, Job), WarehouseError> {
        let job_id = format!("pulse_{kind}_{}", uuid::Uuid::now_v7().simple());
        let body = json!({
            "jobReference": {"projectId": self.project, "jobId": job_id, "location": self.location},
            "configuration": configuration,
        });
        let url = format!("{}/projects/{}/jobs", self.api_url, self.project);
        // A one-shot command: its own stop is Ctrl-C, which ends the process; the handle is
        // here so that the retry is the same one every service uses.
        let inserted = INSERT_RETRY
            .run(
                &Shutdown::new(),
                "job insert",
                |e: &InsertError| transient(e.status),
                || async {
                    // Credentials failing is final, not a reason to retry the insert.
                    let token = self.auth.access_token().await.map_err(|e| InsertError {
                        status: None,
                        message: e.to_string(),
                        credentials: true,
                    })?;
                    match self.insert_job(&url, &body, &token).await {
                        // The job id is ours, so a retried insert that finds it is a success.
                        Ok(()) | Err((Some(409), _)) => Ok(()),
                        Err((status, message)) => Err(InsertError {
                            status,
                            message,
                            credentials: false,
                        }),
                    }
                },
            )
            .await;
        if let Err(e) = inserted {
            let e = e.into_inner();
            return Err(WarehouseError::Api {
                what: if e.credentials {
                    "credentials".to_string()
                } else {
                    format!("{kind} job insert")
                },
                message: e.message,
            });
        }
        tracing::debug!(%job_id, kind, "job inserted");
        let job = self.wait(&job_id).await?;
        Ok((job_id, job))
    }

    /// One jobs.insert call; on failure the HTTP status (None: no answer) and the message.
    async fn insert_job(
        &self,
        url: &str,
        body: &Value,
        token: &str,
    ) -> Result<(), (Option<u16>, String)> {
        let response = self
            .http
            .post(url)
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .map_err(|e| (None, format!("{url}: {e}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        Err((Some(status.as_u16()), format!("{message} ({status})")))
    }

    /// Polls the job until it is DONE; a job that ended with an error is an error, with every
    /// message BigQuery gave (the first is the summary, the rest say which file or row).
    /// Transient polling failures are retried; at the timeout the job is cancelled, so a load
    /// reported as failed does not land later.
    async fn wait(&self, job_id: &str) -> Result<Job, WarehouseError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(200);
        loop {
            let polled = self
                .client
                .job()
                .get_job(&self.project, job_id, Some(&self.location))
                .await;
            match polled {
                Ok(job) => {
                    let status = job.status.clone().unwrap_or_default();
                    if status.state.as_deref() == Some("DONE") {
                        return match status.error_result {
                            Some(err) => Err(WarehouseError::JobFailed {
                                job_id: job_id.to_string(),
                                message: job_messages(err.message, status.errors),
                            }),
                            None => Ok(job),
                        };
                    }
                }
                Err(e) if transient_bq(&e) => {
                    tracing::warn!(error = %e, %job_id, "polling the job failed; retrying");
                }
                Err(e) => return Err(api_error(format!("job {job_id}"), e)),
            }
            if started.elapsed() > self.job_timeout {
                if let Err(e) = self
                    .client
                    .job()
                    .cancel_job(&self.project, job_id, Some(&self.location))
                    .await
                {
                    tracing::warn!(error = %e, %job_id, "cancelling the timed-out job failed");
                }
                return Err(WarehouseError::Timeout {
                    job_id: job_id.to_string(),
                    secs: self.job_timeout.as_secs(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 3 / 2).min(Duration::from_secs(5));
        }
    }

    /// Runs GoogleSQL with the dataset as default (so reports say `FROM events`) and returns the
    /// rows as text columns, the way the REST API gives them.
    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>, WarehouseError> {
        let (job_id, _) = self
            .run_job(
                "query",
                json!({"query": {
                    "query": sql,
                    "useLegacySql": false,
                    "defaultDataset": {"projectId": self.project, "datasetId": self.dataset},
                }}),
            )
            .await?;
        let mut batches = Vec::new();
        let mut page_token = None;
        loop {
            let params = GetQueryResultsParameters {
                location: Some(self.location.clone()),
                page_token: page_token.take(),
                ..Default::default()
            };
            let page = self
                .client
                .job()
                .get_query_results(&self.project, &job_id, params)
                .await
                .map_err(|e| api_error(format!("results of {job_id}"), e))?;
            let names: Vec<String> = page
                .schema
                .and_then(|s| s.fields)
                .unwrap_or_default()
                .into_iter()
                .map(|f| f.name)
                .collect();
            if names.is_empty() {
                return Ok(batches); // DML or DDL: nothing to show
            }
            let rows = page.rows.unwrap_or_default();
            let columns: Vec<ArrayRef> = (0..names.len())
                .map(|i| {
                    let values: StringArray = rows
                        .iter()
                        .map(|r| {
                            r.columns
                                .as_ref()
                                .and_then(|c| c.get(i))
                                .and_then(|c| c.value.as_ref())
                                .and_then(cell_text)
                        })
                        .collect();
                    Arc::new(values) as ArrayRef
                })
                .collect();
            let schema = Schema::new(
                names
                    .iter()
                    .map(|n| Field::new(n, DataType::Utf8, true))
                    .collect::<Vec<_>>(),
            );
            batches.push(RecordBatch::try_new(Arc::new(schema), columns)?);
            page_token = page.page_token.filter(|t| !t.is_empty());
            if page_token.is_none() {
                return Ok(batches);
            }
        }
    }

    /// Deletes a table of the dataset; a missing one is fine.
    pub async fn drop_table(&self, table_id: &str) -> Result<(), WarehouseError> {
        match self
            .client
            .table()
            .delete(&self.project, &self.dataset, table_id)
            .await
        {
            Err(e) if http_status(&e) != Some(404) => {
                Err(api_error(format!("deleting table {table_id}"), e))
            }
            _ => Ok(()),
        }
    }
}

/// A job insert is tried five times (from 0.5 s, doubling).
const INSERT_RETRY: RetryPolicy =
    RetryPolicy::forever(Duration::from_millis(500), Duration::from_secs(8)).with_attempts(5);

/// A failed jobs.insert: the HTTP status (None: no answer) and the message.
#[derive(Debug)]
struct InsertError {
    status: Option<u16>,
    message: String,
    /// The access token could not be had: final.
    credentials: bool,
}

impl std::fmt::Display for InsertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Worth retrying: no answer at all, rate limiting, or a server-side error.
fn transient(status: Option<u16>) -> bool {
    match status {
        None => true,
        Some(s) => s == 429 || s >= 500,
    }
}

/// A failed library call worth retrying: the request did not get through, or the answer was
/// rate limiting or a server error. Credentials and 4xx answers are final.
fn transient_bq(e: &BQError) -> bool {
    match e {
        BQError::RequestError(_) => true,
        BQError::ResponseError { error } => error.error.code == 429 || error.error.code >= 500,
        _ => false,
    }
}

/// The summary first, then the other messages BigQuery gave (which file, which row).
fn job_messages(
    summary: Option<String>,
    errors: Option<Vec<gcp_bigquery_client::model::error_proto::ErrorProto>>,
) -> String {
    let mut messages: Vec<String> = summary.into_iter().collect();
    for m in errors
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| e.message)
    {
        if !messages.contains(&m) {
            messages.push(m);
        }
    }
    messages.join("; ")
}

/// A REST cell as text: scalars as they come, repeated fields as a JSON array of their values.
fn cell_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => {
            let inner: Vec<Value> = items
                .iter()
                .map(|i| i.get("v").cloned().unwrap_or(Value::Null))
                .collect();
            Some(Value::Array(inner).to_string())
        }
        other => Some(other.to_string()),
    }
}
