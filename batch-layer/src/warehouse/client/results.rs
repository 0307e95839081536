//! Results: a query's rows, page by page, as Arrow batches of text columns.

use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray};
use arrow::record_batch::RecordBatch;
use arrow_schema::{DataType, Field, Schema};
use gcp_bigquery_client::model::get_query_results_parameters::GetQueryResultsParameters;
use serde_json::{json, Value};

use super::{api_error, Warehouse, WarehouseError};

impl Warehouse {
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
        self.results(&job_id).await
    }

    /// The one number a finished `SELECT COUNT(*)` job answered.
    pub async fn single_count(&self, job_id: &str) -> Result<u64, WarehouseError> {
        let batches = self.results(job_id).await?;
        count_of(&batches).ok_or_else(|| WarehouseError::Api {
            what: format!("the count of {job_id}"),
            message: "the query returned no number".into(),
        })
    }

    /// The rows of a finished query job, every page.
    pub async fn results(&self, job_id: &str) -> Result<Vec<RecordBatch>, WarehouseError> {
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
                .get_query_results(&self.project, job_id, params)
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
}

/// The first cell of `batches` as a number: a `COUNT(*)`'s answer.
pub fn count_of(batches: &[RecordBatch]) -> Option<u64> {
    batches
        .first()
        .filter(|b| b.num_rows() > 0)
        .and_then(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .map(|a| a.value(0).to_string())
        })
        .and_then(|t| t.parse::<u64>().ok())
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
