//! Provisioning: the dataset and the day-partitioned tables (`events`, `identities`), created
//! or brought to the configured expiration; dropping a table.

use gcp_bigquery_client::model::dataset::Dataset;
use gcp_bigquery_client::model::table::Table;
use gcp_bigquery_client::model::time_partitioning::TimePartitioning;

use super::{api_error, http_status, Warehouse, WarehouseError, DAY_MS};
use gcp_bigquery_client::model::table_schema::TableSchema;

use crate::warehouse::schema::{
    add_columns_ddl, identities_table_schema, missing_columns, table_schema, PARTITION_COLUMN,
};

/// A table `ensure_table` provisions.
struct Wanted<'a> {
    id: &'a str,
    schema: TableSchema,
    description: &'static str,
    /// Add the columns an older table lacks (the events table grows with the event).
    add_columns: bool,
    /// Partitions expire after `--partition-expiration-days` (events), or never
    /// (identities: a merge stays true for every later day's events).
    expires: bool,
}

impl Warehouse {
    /// Creates the dataset and the day-partitioned tables when missing, and brings the
    /// partition expiration of an existing table to the configured one. Idempotent, and safe
    /// when two loaders race (a 409 from the loser counts as success).
    pub async fn ensure_table(&self) -> Result<(), WarehouseError> {
        self.ensure_dataset().await?;
        self.ensure_partitioned(Wanted {
            id: &self.table,
            schema: table_schema(),
            description: "Pulse clickstream events, loaded daily from the Parquet archive",
            add_columns: true,
            expires: true,
        })
        .await?;
        self.ensure_partitioned(Wanted {
            id: &self.identities,
            schema: identities_table_schema(),
            description: "Anonymous devices merged into people by the speed layer, loaded daily \
                          from the Parquet archive (one row per device and day)",
            add_columns: false,
            expires: false,
        })
        .await
    }

    async fn ensure_dataset(&self) -> Result<(), WarehouseError> {
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
        Ok(())
    }

    /// One day-partitioned table, created when missing or checked and brought to the
    /// configured expiration.
    async fn ensure_partitioned(&self, wanted: Wanted<'_>) -> Result<(), WarehouseError> {
        let expiration_days = self.partition_expiration_days.filter(|_| wanted.expires);
        let partitioning = TimePartitioning {
            expiration_ms: expiration_days.map(|d| (u64::from(d) * DAY_MS).to_string()),
            field: Some(PARTITION_COLUMN.to_string()),
            require_partition_filter: None,
            r#type: "DAY".to_string(),
        };
        let tables = self.client.table();
        match tables
            .get(&self.project, &self.dataset, wanted.id, None)
            .await
        {
            Ok(existing) => {
                let current = existing.time_partitioning.clone().unwrap_or_default();
                if current.r#type != "DAY" || current.field.as_deref() != Some(PARTITION_COLUMN) {
                    return Err(WarehouseError::Api {
                        what: format!("table {}", wanted.id),
                        message: format!(
                            "it exists but is not partitioned by day on `{PARTITION_COLUMN}` \
                             ({current:?}); day loads need that"
                        ),
                    });
                }
                if expiration_days.is_some() && current.expiration_ms != partitioning.expiration_ms
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
                        .patch(&self.project, &self.dataset, wanted.id, patch)
                        .await
                        .map_err(|e| api_error("updating partition expiration", e))?;
                    tracing::info!(table = wanted.id, days = ?self.partition_expiration_days, "partition expiration updated");
                }
                match wanted.add_columns {
                    true => self.add_missing_columns(&existing).await,
                    false => Ok(()),
                }
            }
            Err(e) if http_status(&e) == Some(404) => {
                let table = Table::new(&self.project, &self.dataset, wanted.id, wanted.schema)
                    .description(wanted.description)
                    .time_partitioning(partitioning);
                match tables.create(table).await {
                    Ok(_) => {
                        tracing::info!(table = wanted.id, "table created");
                        Ok(())
                    }
                    Err(e) if http_status(&e) == Some(409) => Ok(()),
                    Err(e) => Err(api_error(format!("creating table {}", wanted.id), e)),
                }
            }
            Err(e) => Err(api_error(format!("table {}", wanted.id), e)),
        }
    }

    /// Adds the archive's columns an existing table lacks (a table an older release
    /// created), so that a load of files that carry them does not fail. DDL rather than a
    /// schema patch: the same statement works on BigQuery and on the emulator, and
    /// `IF NOT EXISTS` makes a repeat harmless.
    async fn add_missing_columns(&self, existing: &Table) -> Result<(), WarehouseError> {
        let missing = missing_columns(&existing.schema);
        if missing.is_empty() {
            return Ok(());
        }
        let table = format!("`{}.{}.{}`", self.project, self.dataset, self.table);
        let statements =
            add_columns_ddl(&table, &missing).map_err(|message| WarehouseError::Api {
                what: format!("table {}", self.table),
                message,
            })?;
        let names: Vec<&str> = missing.iter().map(|f| f.name().as_str()).collect();
        tracing::info!(table = %self.table, columns = ?names, "adding columns the table lacks");
        for ddl in statements {
            let configuration = serde_json::json!({"query": {"query": ddl, "useLegacySql": false}});
            self.run_job("add_column", configuration).await?;
        }
        Ok(())
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
