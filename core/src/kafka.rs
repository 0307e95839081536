//! Kafka client setup and topic provisioning, shared by every service.
//!
//! The settings that carry guarantees (acks=all and idempotence on the producer, the murmur2
//! partitioner that Java clients use) are set here once, so no service can forget one.
//! `--kafka-opt key=value` passes any librdkafka property through untouched, applied last.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;

/// Connection settings for Kafka.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Bootstrap brokers, comma separated.
    #[arg(long = "kafka-brokers", env = "PULSE_KAFKA_BROKERS", default_value = "localhost:9092")]
    pub brokers: String,

    /// Any librdkafka property, passed through untouched (repeatable; `;`-separated in the
    /// environment variable). Example: `--kafka-opt security.protocol=SASL_SSL`.
    #[arg(long = "kafka-opt", env = "PULSE_KAFKA_OPTS", value_parser = parse_key_value, value_delimiter = ';')]
    pub options: Vec<(String, String)>,
}

impl Default for KafkaArgs {
    fn default() -> Self {
        Self {
            brokers: "localhost:9092".into(),
            options: Vec::new(),
        }
    }
}

/// `key=value` of a pass-through option flag (`--kafka-opt`, `--store-opt`, `--param`).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected key=value, got \"{s}\""))?;
    Ok((k.trim().to_string(), v.trim().to_string()))
}

impl KafkaArgs {
    pub fn with_brokers(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            options: Vec::new(),
        }
    }

    /// The base client configuration: brokers, then the pass-through options.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        self.apply_options(&mut c);
        c
    }

    /// Producer configuration that keeps the "nothing accepted is lost" guarantee: a write is
    /// acknowledged only when all in-sync replicas have it, and retries never duplicate or
    /// reorder. The murmur2 partitioner maps a key to the same partition as Java producers do,
    /// so any other producer of `events` keeps per-user order with ours.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("batch.size", "1000000")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            // A write not acknowledged within this time fails, and ingest answers 503: bounded,
            // so clients are told and retry instead of hanging.
            .set("message.timeout.ms", "15000")
            // Without this, small acks=all writes wait on Nagle + delayed ACK (~40 ms each).
            .set("socket.nagle.disable", "true");
        self.apply_options(&mut c);
        c
    }

    /// Consumer configuration for `group`: manual offset commits only, since every consumer of
    /// Pulse commits after its output is durable, never before.
    pub fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky");
        self.apply_options(&mut c);
        c
    }

    fn apply_options(&self, c: &mut ClientConfig) {
        for (k, v) in &self.options {
            c.set(k, v);
        }
    }
}

/// Names of the topics Pulse uses.
#[derive(Debug, Clone, clap::Args)]
pub struct TopicArgs {
    /// The event stream written by ingest.
    #[arg(long = "events-topic", env = "PULSE_EVENTS_TOPIC", default_value = "events")]
    pub events: String,
    /// Records a consumer could not use, with the reason.
    #[arg(long = "dlq-topic", env = "PULSE_DLQ_TOPIC", default_value = "events.dlq")]
    pub dlq: String,
    /// Fired triggers, for the notifier.
    #[arg(long = "triggers-topic", env = "PULSE_TRIGGERS_TOPIC", default_value = "triggers")]
    pub triggers: String,
    /// Profile documents Elasticsearch refused for good, with the reason: nothing is dropped
    /// silently, and an operator can fix the cause and write them again.
    #[arg(
        long = "profiles-dlq-topic",
        env = "PULSE_PROFILES_DLQ_TOPIC",
        default_value = "profiles.dlq"
    )]
    pub profiles_dlq: String,
    /// Devices an operator unlinked from the person they had been merged into (compacted;
    /// see `pulse_core::identity::Unlink`).
    #[arg(long = "unlinks-topic", env = "PULSE_UNLINKS_TOPIC", default_value = "identity.unlinks")]
    pub unlinks: String,
    /// Erased people's ids (compacted; see `pulse_core::erasure`): read whole and then
    /// followed by ingest and every consumer.
    #[arg(long = "erasures-topic", env = "PULSE_ERASURES_TOPIC", default_value = "erasures")]
    pub erasures: String,
}

impl Default for TopicArgs {
    fn default() -> Self {
        Self {
            events: "events".into(),
            dlq: "events.dlq".into(),
            triggers: "triggers".into(),
            profiles_dlq: "profiles.dlq".into(),
            unlinks: "identity.unlinks".into(),
            erasures: "erasures".into(),
        }
    }
}

/// A topic as it should exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication: i32,
    /// `cleanup.policy=compact`: the topic keeps the latest record of each key (state), not
    /// every record for a time (events).
    pub compacted: bool,
    /// `max.message.bytes` set at creation (the broker's default when `None`).
    pub max_message_bytes: Option<usize>,
}

impl TopicSpec {
    /// A topic of records kept for the retention time.
    pub fn new(name: impl Into<String>, partitions: i32, replication: i32) -> Self {
        Self {
            name: name.into(),
            partitions,
            replication,
            compacted: false,
            max_message_bytes: None,
        }
    }

    /// The topic takes records up to `bytes` (`max.message.bytes`); an existing topic that
    /// takes less is reported as [`TopicOutcome::Undersized`].
    pub fn with_max_message_bytes(self, bytes: usize) -> Self {
        Self {
            max_message_bytes: Some(bytes),
            ..self
        }
    }

    /// A compacted topic: the latest record per key, kept for good.
    pub fn compacted(name: impl Into<String>, partitions: i32, replication: i32) -> Self {
        Self {
            compacted: true,
            ..Self::new(name, partitions, replication)
        }
    }
}

/// What `ensure_topics` found or did for one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicOutcome {
    Created {
        name: String,
        partitions: i32,
    },
    Exists {
        name: String,
        partitions: i32,
    },
    /// It exists, but takes smaller records than the spec asks (a dead-letter topic created
    /// before its limit was raised, or by hand). Not changed: an operator raises it.
    Undersized {
        name: String,
        partitions: i32,
        max_message_bytes: usize,
        want: usize,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error(
        "topic {name} exists with {have} partitions but {want} are configured. Pulse will not \
         add partitions by itself: that moves users to other partitions and breaks per-user \
         order for events already written. If you mean it, add them with \
         `kafka-topics --alter --partitions {want}` during a pause of all producers, or \
         configure {have}."
    )]
    TooFewPartitions { name: String, have: i32, want: i32 },
    #[error("topic {name} exists with {have} partitions, more than the {want} configured; configure {have} to use it")]
    MorePartitions { name: String, have: i32, want: i32 },
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("creating topic {name}: {code}")]
    Create {
        name: String,
        code: RDKafkaErrorCode,
    },
    #[error("topic {0} was created, but not all its partitions had a leader within the timeout")]
    NoLeader(String),
}

/// Creates missing topics; checks the partition count of existing ones. Idempotent.
///
/// Refuses (does not "fix") a topic whose partition count differs from the spec: changing it
/// remaps keys to partitions, which only an operator should decide.
pub async fn ensure_topics(
    kafka: &KafkaArgs,
    specs: &[TopicSpec],
    timeout: Duration,
) -> Result<Vec<TopicOutcome>, TopicError> {
    let admin: AdminClient<DefaultClientContext> = kafka.client_config().create()?;
    let mut outcomes = Vec::new();
    let mut missing = Vec::new();
    for spec in specs {
        // Metadata for a named topic that does not exist answers with an error on that topic
        // (auto-creation is off on our brokers).
        let metadata = admin.inner().fetch_metadata(Some(&spec.name), timeout)?;
        let existing = metadata
            .topics()
            .iter()
            .find(|t| t.name() == spec.name && t.error().is_none())
            .map(|t| t.partitions().len() as i32);
        match existing {
            Some(have) if have < spec.partitions => {
                return Err(TopicError::TooFewPartitions {
                    name: spec.name.clone(),
                    have,
                    want: spec.partitions,
                })
            }
            Some(have) if have > spec.partitions => {
                return Err(TopicError::MorePartitions {
                    name: spec.name.clone(),
                    have,
                    want: spec.partitions,
                })
            }
            Some(have) => outcomes.push(match spec.max_message_bytes {
                Some(want) => match max_message_bytes(&admin, &spec.name, timeout).await? {
                    Some(limit) if limit < want => TopicOutcome::Undersized {
                        name: spec.name.clone(),
                        partitions: have,
                        max_message_bytes: limit,
                        want,
                    },
                    _ => TopicOutcome::Exists {
                        name: spec.name.clone(),
                        partitions: have,
                    },
                },
                None => TopicOutcome::Exists {
                    name: spec.name.clone(),
                    partitions: have,
                },
            }),
            None => missing.push(spec),
        }
    }
    if missing.is_empty() {
        return Ok(outcomes);
    }
    // `NewTopic` borrows its config values.
    let limits: Vec<Option<String>> = missing
        .iter()
        .map(|s| s.max_message_bytes.map(|b| b.to_string()))
        .collect();
    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
        .zip(&limits)
        .map(|(s, limit)| {
            let topic = NewTopic::new(
                &s.name,
                s.partitions,
                TopicReplication::Fixed(s.replication),
            );
            let topic = match s.compacted {
                true => topic.set("cleanup.policy", "compact"),
                false => topic,
            };
            match limit {
                Some(bytes) => topic.set("max.message.bytes", bytes),
                None => topic,
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(timeout));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(name) => {
                let partitions = missing
                    .iter()
                    .find(|s| s.name == name)
                    .map_or(0, |s| s.partitions);
                outcomes.push(TopicOutcome::Created { name, partitions });
            }
            // Another replica created it between our check and our create: fine.
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                let partitions = missing
                    .iter()
                    .find(|s| s.name == name)
                    .map_or(0, |s| s.partitions);
                outcomes.push(TopicOutcome::Exists { name, partitions });
            }
            Err((name, code)) => return Err(TopicError::Create { name, code }),
        }
    }
    let names: Vec<&str> = missing.iter().map(|s| s.name.as_str()).collect();
    wait_for_leaders(&admin, &names, timeout).await?;
    Ok(outcomes)
}

/// The `max.message.bytes` of an existing topic (`None` if the broker did not say).
async fn max_message_bytes(
    admin: &AdminClient<DefaultClientContext>,
    name: &str,
    timeout: Duration,
) -> Result<Option<usize>, TopicError> {
    Ok(configs_of(admin, name, timeout)
        .await?
        .get("max.message.bytes")
        .and_then(|v| v.parse().ok()))
}

/// The configuration of an existing topic as the broker reports it, defaults included
/// (`retention.ms`, `cleanup.policy`, …).
pub async fn topic_configs(
    kafka: &KafkaArgs,
    name: &str,
    timeout: Duration,
) -> Result<std::collections::BTreeMap<String, String>, TopicError> {
    let admin: AdminClient<DefaultClientContext> = kafka.client_config().create()?;
    configs_of(&admin, name, timeout).await
}

async fn configs_of(
    admin: &AdminClient<DefaultClientContext>,
    name: &str,
    timeout: Duration,
) -> Result<std::collections::BTreeMap<String, String>, TopicError> {
    let options = AdminOptions::new().request_timeout(Some(timeout));
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(name)], &options)
        .await?;
    Ok(described
        .into_iter()
        .flatten()
        .flat_map(|resource| resource.entries)
        .filter_map(|entry| Some((entry.name, entry.value?)))
        .collect())
}

/// Creating a topic returns before its partitions have leaders, and until they do every
/// client gets `NotLeaderForPartition`: `ensure` answers only once the topics are usable.
async fn wait_for_leaders(
    admin: &AdminClient<DefaultClientContext>,
    names: &[&str],
    timeout: Duration,
) -> Result<(), TopicError> {
    let deadline = std::time::Instant::now() + timeout;
    for name in names {
        loop {
            let metadata = admin.inner().fetch_metadata(Some(name), timeout)?;
            let led = metadata
                .topics()
                .iter()
                .find(|t| t.name() == *name && t.error().is_none())
                .is_some_and(|t| {
                    !t.partitions().is_empty()
                        && t.partitions()
                            .iter()
                            .all(|p| p.error().is_none() && p.leader() >= 0)
                });
            if led {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(TopicError::NoLeader(name.to_string()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_pass_through_last() {
        let args = KafkaArgs {
            brokers: "b:1".into(),
            options: vec![
                ("linger.ms".into(), "50".into()),
                ("client.id".into(), "x".into()),
            ],
        };
        let c = args.producer_config();
        assert_eq!(c.get("linger.ms"), Some("50"));
        assert_eq!(c.get("client.id"), Some("x"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
    }

    #[test]
    fn key_value_parser() {
        assert_eq!(
            parse_key_value("a=b=c").unwrap(),
            ("a".into(), "b=c".into())
        );
        assert!(parse_key_value("nope").is_err());
    }
}
