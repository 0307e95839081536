//! The Pulse speed layer.
//!
//! - [`engine`]: the consumer loop (profiles in memory, flush to Elasticsearch, commit after).
//! - [`profile`] and [`models`]: what a profile is and how events fold into it.
//! - [`store`]: `ProfileStore`, profiles in Elasticsearch.
//! - [`triggers`]: rules that fire on events; [`notifier`] delivers them to a webhook.
//! - [`api`]: the stateless profile lookup API (`/api/v1/getGender/{cid}`).

pub mod api;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod models;
pub mod notifier;
pub mod profile;
pub mod store;
pub mod triggers;
