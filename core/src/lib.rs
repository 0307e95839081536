//! The Pulse event model and the setup shared by every service.
//!
//! Everything that must agree between ingest, the speed layer and the batch layer lives here:
//! how a raw JSON event becomes the one canonical [`Event`], which field names and forms are
//! accepted ([`parse`], [`segment`]), the Kafka key that keeps one user's events in order
//! ([`Event::partition_key`]), the Arrow schema the archive is written with ([`schema`]), and
//! how clients for Kafka are configured ([`kafka`]). No I/O loops live here.

pub mod erasure;
pub mod error;
pub mod event;
pub mod identity;
pub mod kafka;
pub mod limits;
pub mod names;
pub mod parse;
pub mod partitioner;
pub mod schema;
pub mod segment;
pub mod telemetry;
pub mod validate;

pub use error::EventError;
pub use event::Event;
pub use limits::Limits;
pub use parse::{parse_event, ParseContext};
