//! The stateless HTTP ingest tier of Pulse.
//!
//! Requests are authenticated by a partner's write key ([`auth`]), decoded ([`body`]), parsed
//! by `pulse-core`, and written to Kafka ([`publish`]). A request is answered 2xx only after
//! Kafka acknowledged every one of its events. [`loadgen`] generates realistic clickstream for
//! the demo, the tests and the benchmarks.

pub mod auth;
pub mod body;
pub mod config;
pub mod loadgen;
pub mod metrics;
pub mod ops;
pub mod publish;
pub mod server;

pub use config::IngestConfig;
pub use server::{serve, IngestError};
