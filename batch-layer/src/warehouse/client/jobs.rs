//! Jobs: inserted with a plain JSON body (retried as one `RetryPolicy` says), then polled
//! until done, with every message BigQuery gave when one fails.

use std::time::{Duration, Instant};

use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::model::job::Job;
use pulse_service::{RetryPolicy, Shutdown};
use serde_json::{json, Value};

use super::{api_error, Warehouse, WarehouseError};

impl Warehouse {
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
        let mut pauses = JOB_POLL.delays();
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
            tokio::time::sleep(pauses.next().unwrap_or(JOB_POLL.max)).await;
        }
    }
}

/// A running job is polled from 200 ms, doubling up to 5 s (jittered, as every wait is): a
/// small load is seen done at once, a long one is not polled more than every few seconds.
/// The job timeout, not the policy, ends the polling.
const JOB_POLL: RetryPolicy =
    RetryPolicy::forever(Duration::from_millis(200), Duration::from_secs(5));

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
