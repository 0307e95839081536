//! The Pulse batch layer.
//!
//! - [`archiver`]: every event as Parquet in object storage, exactly once ([`layout`] says
//!   where and which files count; [`parquet_file`] writes them).
//! - [`sql`]: BI SQL over the archive on an embedded engine (DataFusion).
//! - [`dedupe`]: the rule every reader applies: each `(partner_id, message_id)` once.
//! - [`identities`]: the devices the speed layer merged into people, for reports that count
//!   people.
//! - [`store`]: the object store (local directory, `s3://`, `gs://`).
//! - [`warehouse`]: BigQuery: the day-partitioned table, daily loads, BI SQL on BigQuery.
//!
//! [`layout`], [`parquet_file`] and [`store`] are the archive's format, in `pulse-archive`
//! (the speed layer's recompute reads the archive too).

pub mod archiver;
pub mod dedupe;
pub mod deduped_events;
pub mod identities;
pub mod sql;
pub mod warehouse;

pub use pulse_archive::{identity_file, layout, parquet_file, store};
