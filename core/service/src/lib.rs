//! The plumbing every Pulse service shares, at the bottom of the crate graph beside the event
//! model: the operations endpoint and the one Prometheus recorder ([`ops`]), the shutdown
//! handle every loop observes ([`Shutdown`]) and the partner key files ([`keys`]).

pub mod keys;
pub mod ops;
mod shutdown;

pub use ops::Readiness;
pub use shutdown::Shutdown;
