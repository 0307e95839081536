//! The embedded engine's `events` table: `events_raw` with each `(date, partner_id,
//! message_id)` once, the very rows [`crate::dedupe::first_of_each_message`] keeps, found the
//! cheap way.
//!
//! That SQL ranks every row in one window: a sort of the whole archive by the key and ten
//! tie-breakers, carrying every column. On DataFusion that cost three times DuckDB's time for
//! the same view (`bench/archive`), whatever the report. But copies are rare (a client retry,
//! a producer retry), so this table first finds the keys that occur more than once (one hash
//! aggregate over three columns). Without any, a query reads the raw rows as they are; with
//! some, it reads the rows of every other key as they are and ranks only the copies.
//!
//! Filters on the key's columns are applied before that (they keep or drop every copy of a
//! key alike, so a report of one day deduplicates one day); any other filter only after, as
//! for a view: a copy kept or dropped depends on all copies, not on what a query asks for.

use std::sync::Arc;

use arrow_schema::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::SessionState;
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::{
    col, lit, Expr, ExprFunctionExt, JoinType, TableProviderFilterPushDown, TableType,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;

use crate::dedupe::{KEY, ORDER};

/// Name of the rank column while the copies are ranked (never in the output).
const RANK: &str = "pulse_copy";

/// `events`: [`crate::sql::RAW_TABLE`] deduplicated.
#[derive(Debug)]
pub struct DedupedEvents {
    raw: Arc<dyn TableProvider>,
}

impl DedupedEvents {
    pub fn new(raw: Arc<dyn TableProvider>) -> Self {
        Self { raw }
    }
}

/// Whether `filter` reads the key's columns only (then it commutes with the dedupe).
fn on_key(filter: &Expr) -> bool {
    filter
        .column_refs()
        .iter()
        .all(|c| KEY.contains(&c.name.as_str()))
}

fn columns(names: &[&str]) -> Vec<Expr> {
    names.iter().map(|n| col(*n)).collect()
}

#[async_trait]
impl TableProvider for DedupedEvents {
    fn schema(&self) -> SchemaRef {
        self.raw.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Inexact: applied here before the dedupe, and by the engine again after it.
        Ok(filters
            .iter()
            .map(|f| match on_key(f) {
                true => TableProviderFilterPushDown::Inexact,
                false => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let session = state
            .as_any()
            .downcast_ref::<SessionState>()
            .ok_or_else(|| DataFusionError::Internal("events: not a SessionState".into()))?;
        let ctx = SessionContext::new_with_state(session.clone());
        let mut raw = ctx.read_table(self.raw.clone())?;
        for f in filters.iter().filter(|f| on_key(f)) {
            raw = raw.filter(f.clone())?;
        }
        let copied = raw
            .clone()
            .aggregate(columns(&KEY), vec![count(lit(1)).alias("copies")])?
            .filter(col("copies").gt(lit(1)))?
            .select_columns(&KEY)?
            .collect()
            .await?;
        let deduped = match copied.iter().map(|b| b.num_rows()).sum::<usize>() {
            0 => raw,
            _ => {
                let names: Vec<String> = self
                    .raw
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect();
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let copied = ctx.read_batches(copied)?.alias("copied")?;
                let raw = raw.alias("raw")?;
                let single =
                    raw.clone()
                        .join(copied.clone(), JoinType::LeftAnti, &KEY, &KEY, None)?;
                let order = ORDER
                    .iter()
                    .map(|c| col(*c).sort(true, true))
                    .collect::<Vec<_>>();
                let rank = row_number()
                    .partition_by(columns(&KEY))
                    .order_by(order)
                    .build()?
                    .alias(RANK);
                let first = raw
                    .join(copied, JoinType::LeftSemi, &KEY, &KEY, None)?
                    .window(vec![rank])?
                    .filter(col(RANK).eq(lit(1u64)))?
                    .select_columns(&names)?;
                single.union(first)?
            }
        };
        let deduped = match projection {
            Some(p) => {
                let schema = self.raw.schema();
                let names: Vec<&str> = p.iter().map(|i| schema.field(*i).name().as_str()).collect();
                deduped.select_columns(&names)?
            }
            None => deduped,
        };
        let deduped = match limit {
            Some(n) => deduped.limit(0, Some(n))?,
            None => deduped,
        };
        state.create_physical_plan(deduped.logical_plan()).await
    }
}
