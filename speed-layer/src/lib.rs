//! The Pulse speed layer.
//!
//! - [`engine`]: the consumer loop (profiles in memory, flush to Elasticsearch, commit after).
//! - [`profile`] and [`models`]: what a profile is and how events fold into it;
//!   [`dedupe`]: the message ids a profile remembers, so a client retry counts once.
//! - [`identity`]: anonymous devices merged into the person who logged in on them.
//! - [`store`]: `ProfileStore`, profiles in Elasticsearch.
//! - [`triggers`]: rules that fire on events; [`notifier`] delivers them to a webhook.
//! - [`recompute`]: profiles rebuilt from the archive and Kafka into a new index, promoted.
//! - [`poison`]: a record that made the process panic is dead-lettered on the restart.
//! - [`api`]: the stateless profile lookup API (`/api/v1/getGender/{cid}`).

pub mod api;
pub mod client_context;
pub mod config;
pub mod counts;
pub mod dedupe;
pub mod engine;
pub mod erase;
pub mod identity;
pub mod interned;
pub mod metrics;
pub mod models;
pub mod notifier;
pub mod poison;
pub mod profile;
pub mod recompute;
pub mod store;
pub mod triggers;
pub mod unlinks;
