//! Pulse's operator commands (`pulse-admin`), at the top of the crate graph: they reach every
//! store.
//!
//! - [`topics`]: creating, inspecting and describing the retention of the Kafka topics;
//! - [`erase`]: erasing people (the right to be forgotten) from every store, with an audit
//!   log.

pub mod erase;
pub mod topics;
