//! Ingest settings: every one a CLI flag with a `PULSE_…` environment twin.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pulse_core::kafka::KafkaArgs;
use pulse_core::Limits;

use crate::suppress::ErasedResponse;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "pulse-ingest", about = "Pulse HTTP ingest: events in, Kafka out", version)]
pub struct IngestConfig {
    /// Address to listen on.
    #[arg(long, env = "PULSE_INGEST_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Topic the events are written to.
    #[arg(long = "events-topic", env = "PULSE_EVENTS_TOPIC", default_value = "events")]
    pub topic: String,

    /// JSON file mapping write keys to partner ids: `{"key": "partner_id", …}`.
    #[arg(long, env = "PULSE_WRITE_KEYS_FILE")]
    pub write_keys_file: Option<PathBuf>,

    /// A write key as KEY=PARTNER_ID (repeatable; comma-separated in the environment).
    #[arg(long = "write-key", env = "PULSE_WRITE_KEYS", value_delimiter = ',')]
    pub write_keys: Vec<String>,

    /// Largest request body, after gzip decompression, in bytes.
    #[arg(long, env = "PULSE_MAX_BODY_BYTES", default_value_t = 5 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Largest single event, in bytes.
    #[arg(long, env = "PULSE_MAX_EVENT_BYTES", default_value_t = Limits::default().max_event_bytes)]
    pub max_event_bytes: usize,

    /// Most events in one request.
    #[arg(long, env = "PULSE_MAX_BATCH_EVENTS", default_value_t = Limits::default().max_batch_events)]
    pub max_batch_events: usize,

    /// How far ahead of the receive time an event's `timestamp` may be, in seconds; events
    /// further in the future are refused with 400 (a wrong client clock would otherwise move
    /// `last_visit` into the future for good).
    /// At most 604800 (7 days): consumers refuse anything further ahead whatever this says.
    #[arg(long, env = "PULSE_MAX_FUTURE_SECS", default_value_t = Limits::default().max_future_secs,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(pulse_core::limits::MAX_FUTURE_SECS_CEILING)))]
    pub max_future_secs: u32,

    /// The compacted topic of erased people's ids, followed while ingest runs (see
    /// `pulse_core::erasure`).
    #[arg(long = "erasures-topic", env = "PULSE_ERASURES_TOPIC", default_value = "erasures")]
    pub erasures_topic: String,

    /// What a request carrying an erased person's events gets: `drop` answers as if they were
    /// accepted and writes the others (as Segment does), `forbid` refuses it with 403 listing
    /// them and writes nothing of it.
    #[arg(long, env = "PULSE_ERASED_RESPONSE", value_enum, default_value_t = ErasedResponse::Drop)]
    pub erased_response: ErasedResponse,

    /// Seconds a client is told to wait (Retry-After) when Kafka is unavailable.
    #[arg(long, env = "PULSE_RETRY_AFTER_SECS", default_value_t = 5)]
    pub retry_after_secs: u64,

    /// On shutdown, how long to wait for Kafka to acknowledge what is in flight.
    #[arg(long, env = "PULSE_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
}

impl IngestConfig {
    /// Defaults for a service on `brokers`, for tests and embedding.
    pub fn for_brokers(brokers: &str) -> Self {
        Self {
            listen: ([127, 0, 0, 1], 0).into(),
            kafka: KafkaArgs::with_brokers(brokers),
            topic: "events".into(),
            write_keys_file: None,
            write_keys: Vec::new(),
            max_body_bytes: 5 * 1024 * 1024,
            max_event_bytes: Limits::default().max_event_bytes,
            max_batch_events: Limits::default().max_batch_events,
            max_future_secs: Limits::default().max_future_secs,
            erasures_topic: "erasures".into(),
            erased_response: ErasedResponse::Drop,
            retry_after_secs: 5,
            shutdown_timeout_secs: 30,
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_event_bytes: self.max_event_bytes,
            max_batch_events: self.max_batch_events,
            max_future_secs: self.max_future_secs,
            ..Limits::default()
        }
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
}
