//! The stateless HTTP ingest tier of Pulse.
//!
//! Requests are authenticated by a partner's write key (`pulse_service::keys`), decoded
//! ([`body`]), parsed by `pulse-core`, and written to Kafka ([`publish`]). A request is
//! answered 2xx only after Kafka acknowledged every one of its events. The load generator is
//! the crate `pulse-loadgen` beside this one.

pub mod body;
pub mod config;
pub mod metrics;
pub mod publish;
pub mod server;
pub mod suppress;

pub use config::IngestConfig;
pub use server::{serve, IngestError};
