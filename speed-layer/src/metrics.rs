//! Metric names of the speed layer and the notifier (the endpoint that serves them is
//! `pulse_service::ops`).

pub const EVENTS_FOLDED: &str = "pulse_speed_events_folded_total";
pub const EVENTS_SKIPPED: &str = "pulse_speed_events_skipped_total";
pub const EVENTS_DUPLICATE: &str = "pulse_speed_events_duplicate_total";
/// Events and identity records of erased people passed over (`pulse_core::erasure`).
pub const RECORDS_ERASED: &str = "pulse_speed_records_erased_total";
/// Documents of erased people the live layer deleted from its index.
pub const PROFILES_ERASED: &str = "pulse_speed_profiles_erased_total";
pub const EVENTS_DEAD_LETTERED: &str = "pulse_speed_events_dead_lettered_total";
pub const TRIGGERS_FIRED: &str = "pulse_speed_triggers_fired_total";
pub const PROFILES_IN_MEMORY: &str = "pulse_speed_profiles_in_memory";
pub const PROFILES_DIRTY: &str = "pulse_speed_profiles_dirty";
pub const PROFILES_LOADED: &str = "pulse_speed_profiles_loaded_total";
/// How long a batch's load of the profiles not in memory took (one mget per 1,000 ids, its
/// retries included): every new user's first event waits for it, and so do its triggers.
pub const PROFILE_LOAD_SECONDS: &str = "pulse_speed_profile_load_seconds";
pub const EVICTIONS: &str = "pulse_speed_profiles_evicted_total";
pub const FLUSHES: &str = "pulse_speed_flushes_total";
pub const FLUSH_FAILURES: &str = "pulse_speed_flush_failures_total";
pub const FLUSH_SECONDS: &str = "pulse_speed_flush_seconds";
pub const DOCS_WRITTEN: &str = "pulse_speed_docs_written_total";
pub const DOCS_STALE: &str = "pulse_speed_docs_stale_total";
pub const DOCS_REJECTED: &str = "pulse_speed_docs_rejected_total";
/// Identity unification (see `crate::identity`): links asked for by people, merges sent by
/// devices and applied by people, events forwarded from merged devices, copies of identity
/// records recognised and skipped, links refused (`reason`), junk or self ids ignored.
pub const IDENTITY_LINKS_ASKED: &str = "pulse_speed_identity_links_asked_total";
pub const IDENTITY_MERGES_SENT: &str = "pulse_speed_identity_merges_sent_total";
pub const IDENTITY_MERGED: &str = "pulse_speed_identity_merged_total";
pub const IDENTITY_FORWARDED: &str = "pulse_speed_identity_forwarded_total";
pub const IDENTITY_COPIES: &str = "pulse_speed_identity_copies_skipped_total";
pub const IDENTITY_REFUSED: &str = "pulse_speed_identity_links_refused_total";
pub const IDENTITY_IGNORED: &str = "pulse_speed_identity_ids_ignored_total";
/// Pointers turned back into profiles of their own by an event of their own user id.
pub const IDENTITY_RECLAIMED: &str = "pulse_speed_identity_reclaimed_total";

pub const NOTIFY_DELIVERED: &str = "pulse_notifier_delivered_total";
pub const NOTIFY_DUPLICATE: &str = "pulse_notifier_duplicates_total";
pub const NOTIFY_RATE_LIMITED: &str = "pulse_notifier_rate_limited_total";
/// Triggers of people erased since they fired, not delivered.
pub const NOTIFY_ERASED: &str = "pulse_notifier_erased_total";
pub const NOTIFY_EXPIRED: &str = "pulse_notifier_expired_total";
pub const NOTIFY_RETRIES: &str = "pulse_notifier_retries_total";
pub const NOTIFY_DEAD_LETTERED: &str = "pulse_notifier_dead_lettered_total";
/// Failed Kafka calls a trigger waits for (push state, dead letters), each retried.
pub const NOTIFY_KAFKA_FAILURES: &str = "pulse_notifier_kafka_failures_total";
pub const NOTIFY_LATENCY: &str = "pulse_notifier_trigger_to_delivery_seconds";
