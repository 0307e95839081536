//! The Pulse batch layer.
//!
//! - [`archiver`]: every event as Parquet in object storage, exactly once ([`layout`] says
//!   where and which files count; [`parquet_file`] writes them).
//! - [`sql`]: BI SQL over the archive on an embedded engine (DataFusion).
//! - [`dedupe`]: the rule every reader applies: each `(partner_id, message_id)` once.
//! - [`store`]: the object store (local directory, `s3://`, `gs://`).
//! - [`warehouse`]: BigQuery: the day-partitioned table, daily loads, BI SQL on BigQuery.

pub mod archiver;
pub mod dedupe;
pub mod layout;
pub mod parquet_file;
pub mod sql;
pub mod store;
pub mod warehouse;
