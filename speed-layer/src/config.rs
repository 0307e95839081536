//! Speed-layer settings: every one a CLI flag with a `PULSE_…` environment twin.

use pulse_service::RetryPolicy;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pulse_core::kafka::{KafkaArgs, TopicArgs};

use crate::dedupe::DedupePolicy;
use crate::store::EsArgs;

#[derive(Debug, Clone, clap::Args)]
pub struct SpeedConfig {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topics: TopicArgs,
    #[command(flatten)]
    pub es: EsArgs,

    /// Consumer group; replicas of the same group share the partitions.
    #[arg(long, env = "PULSE_SPEED_GROUP", default_value = "speed")]
    pub group: String,

    #[command(flatten)]
    pub flush: FlushPolicy,

    #[command(flatten)]
    pub dedupe: DedupePolicy,

    #[command(flatten)]
    pub identity: crate::identity::IdentityPolicy,

    /// Most profiles held in memory; beyond it, clean profiles are evicted oldest first.
    #[arg(long, env = "PULSE_MAX_PROFILES", default_value_t = 2_000_000)]
    pub max_profiles: usize,

    /// Profiles untouched this long are evicted after a flush (reloaded from Elasticsearch when
    /// seen again).
    #[arg(long, env = "PULSE_IDLE_EVICT_SECS", default_value_t = 300)]
    pub idle_evict_secs: u64,

    /// Profile models to run (comma separated; empty: all registered).
    #[arg(long, env = "PULSE_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,

    /// Window of MODEL3, in days.
    #[arg(long, env = "PULSE_GENDER_WINDOW_DAYS", default_value_t = 7)]
    pub window_days: u32,

    /// Trigger rules (TOML). Without it no triggers fire.
    #[arg(long, env = "PULSE_RULES_FILE")]
    pub rules_file: Option<PathBuf>,

    /// Most records handled as one batch (one mget for the profiles they need).
    #[arg(long, env = "PULSE_MAX_BATCH", default_value_t = 10_000)]
    pub max_batch: usize,

    /// Stop (after a final flush and commit) once every assigned partition is read to its end:
    /// for catch-up and replay jobs, and benchmarks.
    #[arg(long, env = "PULSE_STOP_AT_END")]
    pub stop_at_end: bool,

    /// Where the speed layer keeps local state that must outlive a crash: the journal of a
    /// record that made it panic, dead-lettered on the restart (see `poison`). In
    /// Kubernetes, an `emptyDir` volume (it survives container restarts).
    #[arg(long, env = "PULSE_SPEED_STATE_DIR", default_value = "/tmp/pulse-speed")]
    pub state_dir: PathBuf,

    /// Fault injection for the crash tests: panic while folding the event with this
    /// `message_id`. Never set it in production.
    #[arg(long, env = "PULSE_FAILPOINT_PANIC_MESSAGE_ID", hide = true)]
    pub failpoint_panic_message_id: Option<String>,

    /// Fault injection for the producer test: make the triggers/dead-letter producer fail for
    /// good (as an out-of-sequence answer would) while folding the event with this
    /// `message_id`. Never set it in production.
    #[arg(long, env = "PULSE_FAILPOINT_FATAL_PRODUCER_MESSAGE_ID", hide = true)]
    pub failpoint_fatal_producer_message_id: Option<String>,

    /// Fault injection for the crash tests: SIGKILL the process when an event with one of
    /// these `message_id`s (comma separated) is first handled (folded, or passed on for a
    /// merged device). Never set it in production.
    #[arg(long, env = "PULSE_FAILPOINT_KILL_MESSAGE_IDS", hide = true, value_delimiter = ',')]
    pub failpoint_kill_message_ids: Vec<String>,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "PULSE_SPEED_METRICS_LISTEN", default_value = "0.0.0.0:9101")]
    pub metrics_listen: SocketAddr,
}

impl SpeedConfig {
    /// The identity rules with the devices operators unlinked, read from `--unlinks-topic`:
    /// what every process that folds profiles starts with.
    pub fn identity_policy(
        &self,
    ) -> Result<crate::identity::IdentityPolicy, rdkafka::error::KafkaError> {
        let unlinks = crate::unlinks::Unlinks::load(&self.kafka, &self.topics.unlinks)?;
        Ok(crate::identity::IdentityPolicy {
            unlinks: std::sync::Arc::new(unlinks),
            ..self.identity.clone()
        })
    }

    /// The erasures, read to the end and then followed (see `pulse_service::erasures`).
    pub fn erasure_feed(
        &self,
    ) -> Result<pulse_service::erasures::ErasureFeed, pulse_service::erasures::FeedError> {
        pulse_service::erasures::ErasureFeed::follow_loaded(
            self.kafka.consumer_config("pulse-speed-erasures"),
            &self.topics.erasures,
        )
    }

    /// The journal of records that made this consumer panic (see [`crate::poison`]).
    pub fn poison_journal(&self) -> crate::poison::PoisonJournal {
        crate::poison::PoisonJournal::new(&self.state_dir, &self.topics.events, &self.group)
    }
}

/// When dirty profiles are written to Elasticsearch.
#[derive(Debug, Clone, clap::Args)]
pub struct FlushPolicy {
    /// Seconds between flushes.
    #[arg(long = "flush-interval-secs", env = "PULSE_FLUSH_INTERVAL_SECS", default_value_t = 30.0)]
    pub interval_secs: f64,
    /// Flush early when this many profiles are dirty (bounds memory and replay after a crash).
    #[arg(long = "flush-max-dirty", env = "PULSE_FLUSH_MAX_DIRTY", default_value_t = 500_000)]
    pub max_dirty: usize,
    /// Documents per `_bulk` request.
    #[arg(long = "bulk-docs", env = "PULSE_BULK_DOCS", default_value_t = 2_000)]
    pub bulk_docs: usize,
    /// Longest wait between retries of a failing flush, seconds.
    #[arg(long = "max-backoff-secs", env = "PULSE_MAX_BACKOFF_SECS", default_value_t = 10.0)]
    pub max_backoff_secs: f64,
}

impl FlushPolicy {
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.interval_secs.max(0.01))
    }

    pub fn is_due(&self, since_last: Duration, dirty: usize) -> bool {
        dirty > 0 && (since_last >= self.interval() || dirty >= self.max_dirty)
    }

    /// How Elasticsearch calls are retried: from 100 ms, doubling, up to
    /// `--max-backoff-secs` (with jitter; see `pulse_service::RetryPolicy`).
    pub fn retry(&self) -> RetryPolicy {
        RetryPolicy::forever(
            Duration::from_millis(100),
            Duration::from_secs_f64(self.max_backoff_secs.max(0.1)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy() {
        let p = FlushPolicy {
            interval_secs: 30.0,
            max_dirty: 10,
            bulk_docs: 100,
            max_backoff_secs: 5.0,
        };
        assert!(!p.is_due(Duration::from_secs(60), 0));
        assert!(!p.is_due(Duration::from_secs(1), 9));
        assert!(p.is_due(Duration::from_secs(1), 10));
        assert!(p.is_due(Duration::from_secs(30), 1));
        assert_eq!(p.retry().first, Duration::from_millis(100));
        assert_eq!(p.retry().max, Duration::from_secs(5));
        assert!(p
            .retry()
            .delays()
            .take(30)
            .all(|d| d <= Duration::from_secs(5)));
    }
}
