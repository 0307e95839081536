//! The plumbing every Pulse service shares, at the bottom of the crate graph beside the event
//! model: the operations endpoint and the one Prometheus recorder ([`ops`]), the shutdown
//! handle every loop observes ([`Shutdown`]), the one retry policy ([`retry`]), the pieces
//! of the consumer skeleton ([`consumer`]), the erasures every reader follows ([`erasures`]), the outbox that writes triggers and dead letters
//! ([`outbox`]) and the partner key files ([`keys`]).

pub mod consumer;
pub mod erasures;
pub mod keys;
pub mod ops;
pub mod outbox;
pub mod retry;
mod shutdown;

pub use ops::{Condition, Readiness};
pub use retry::{RetryError, RetryPolicy};
pub use shutdown::Shutdown;
