//! What the notifier pushed lately, per user: the idempotency keys delivered and when the last
//! push went out. The dedupe and the rate limit read it, so it must survive a restart and a
//! rebalance: it lives in memory and in a compacted topic (`--state-topic`), one record per
//! user, keyed like the user's triggers and written to the same partition number as them. A
//! notifier given a triggers partition first reads that partition of the state topic to its
//! end, so it knows what the previous owner pushed.
//!
//! The order per trigger: deliver, write the user's record and wait for Kafka's ack, then
//! commit the trigger. A crash between the delivery and the ack pushes that one trigger again
//! after the restart (with the same `Idempotency-Key` header, which a provider that
//! deduplicates drops); a crash at any other point pushes nothing twice.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use pulse_core::kafka::{ensure_topics, KafkaArgs, TopicSpec};
use pulse_service::outbox::fatal_error;
use pulse_service::Shutdown;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};

/// One user's recent pushes, as stored in the state topic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserPushes {
    /// Epoch milliseconds of the last push.
    pub last_push_ms: i64,
    /// Idempotency keys delivered, each with the epoch milliseconds of its delivery.
    pub delivered: Vec<(String, i64)>,
}

/// Most idempotency keys remembered per user: without a rate limit a very active user's
/// record would otherwise grow past what Kafka takes in one record.
const MAX_KEYS_PER_USER: usize = 1_000;

/// Users are looked over for expiry after this many recorded pushes.
const EXPIRE_EVERY: u64 = 10_000;

impl UserPushes {
    /// Records a delivery at `now_ms`, forgetting deliveries older than `horizon_ms` and the
    /// oldest beyond [`MAX_KEYS_PER_USER`].
    fn record(&mut self, key: &str, now_ms: i64, horizon_ms: i64) {
        self.last_push_ms = now_ms;
        self.delivered.retain(|(_, at)| now_ms - at < horizon_ms);
        self.delivered.push((key.to_string(), now_ms));
        let excess = self.delivered.len().saturating_sub(MAX_KEYS_PER_USER);
        self.delivered.drain(..excess);
    }

    /// Whether nothing of it matters any more at `now_ms`: the last push is past the horizon.
    fn expired(&self, now_ms: i64, horizon_ms: i64) -> bool {
        now_ms - self.last_push_ms >= horizon_ms
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("state topic: {0}")]
    Topic(#[from] pulse_core::kafka::TopicError),
    #[error("triggers topic {0} not found")]
    NoTriggersTopic(String),
    #[error("stopped before the state was written")]
    Stopped,
    #[error("{0}")]
    Erasures(String),
    /// A producer failed for good (see `pulse_service::outbox::is_fatal`); the process stops,
    /// and the restart handles every uncommitted trigger again.
    #[error("the Kafka producer failed for good ({0}); a restart handles every uncommitted trigger again")]
    Producer(String),
}

/// The pushes of the users of the triggers partitions this notifier owns.
pub struct PushLedger {
    /// User key → (triggers partition, pushes).
    users: HashMap<String, (i32, UserPushes)>,
    /// Triggers partitions whose state was read from the state topic since their assignment.
    restored: HashSet<i32>,
    /// How long a delivery is remembered.
    horizon_ms: i64,
    /// Pushes recorded since the last expiry.
    since_expiry: u64,
    topic: String,
    kafka: KafkaArgs,
    producer: FutureProducer,
    calls: super::KafkaCalls,
}

impl PushLedger {
    /// The ledger on `topic`, created (compacted, as many partitions as `triggers`) when
    /// missing; an existing one with another partition count is refused with the reason.
    pub async fn open(
        kafka: &KafkaArgs,
        triggers: &str,
        topic: &str,
        horizon: Duration,
        calls: super::KafkaCalls,
    ) -> Result<Self, LedgerError> {
        let partitions = partition_count(kafka, triggers).await?;
        // Replication as the triggers topic has it is not known here; 1 serves one broker
        // and `pulse-admin topics ensure --replication 3` provisions production up front.
        let spec = TopicSpec::compacted(topic, partitions, 1);
        ensure_topics(kafka, &[spec], Duration::from_secs(30)).await?;
        Ok(Self {
            users: HashMap::new(),
            restored: HashSet::new(),
            horizon_ms: horizon.as_millis() as i64,
            since_expiry: 0,
            topic: topic.to_string(),
            kafka: kafka.clone(),
            producer: kafka.producer_config().create()?,
            calls,
        })
    }

    /// The fatal error the state producer raised, if any.
    pub fn fatal_error(&self) -> Option<String> {
        fatal_error(self.producer.client())
    }

    /// Whether `key` was delivered to `user` within the horizon.
    pub fn delivered(&self, user: &str, key: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|(_, p)| p.delivered.iter().any(|(k, _)| k == key))
    }

    /// When `user` was last pushed to, epoch milliseconds.
    pub fn last_push_ms(&self, user: &str) -> Option<i64> {
        self.users.get(user).map(|(_, p)| p.last_push_ms)
    }

    /// Whether the state of triggers partition `partition` was read since its assignment.
    pub fn is_restored(&self, partition: i32) -> bool {
        self.restored.contains(&partition)
    }

    /// The state of triggers partition `partition`, read from the state topic to its end.
    pub async fn read(
        &self,
        partition: i32,
    ) -> Result<Vec<(String, Option<UserPushes>)>, rdkafka::error::KafkaError> {
        let (kafka, topic) = (self.kafka.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || read_partition(&kafka, &topic, partition))
            .await
            .map_err(|_| rdkafka::error::KafkaError::Canceled)?
    }

    /// [`PushLedger::read`] of each of `partitions`, all at once.
    #[allow(clippy::type_complexity)]
    pub async fn read_all(
        &self,
        partitions: &[i32],
    ) -> Result<Vec<(i32, Vec<(String, Option<UserPushes>)>)>, rdkafka::error::KafkaError> {
        futures::future::try_join_all(
            partitions
                .iter()
                .map(|&p| async move { Ok((p, self.read(p).await?)) }),
        )
        .await
    }

    /// Takes the state [`PushLedger::read`] returned for `partition` as this notifier's.
    /// Users whose last push is past the horizon are left out: they matter no more.
    pub fn restored(&mut self, partition: i32, records: Vec<(String, Option<UserPushes>)>) {
        let count = records.len();
        let now_ms = chrono::Utc::now().timestamp_millis();
        for (user, pushes) in records {
            match pushes {
                Some(p) if !p.expired(now_ms, self.horizon_ms) => {
                    self.users.insert(user, (partition, p))
                }
                _ => self.users.remove(&user),
            };
        }
        tracing::info!(partition, records = count, "push state restored");
        self.restored.insert(partition);
    }

    /// Forgets the pushes of `user` (an erased person's; the state topic's tombstone is
    /// written by the erasure, [`erase_users`]).
    pub fn forget_user(&mut self, user: &str) {
        self.users.remove(user);
    }

    /// `partitions` went to another notifier: what it pushes from now on is not seen here, so
    /// their state is read again if they come back.
    pub fn forget(&mut self, partitions: &[i32]) {
        self.users.retain(|_, (p, _)| !partitions.contains(p));
        for p in partitions {
            self.restored.remove(p);
        }
    }

    /// Records a delivery to `user` (of triggers partition `partition`) and waits until the
    /// state topic has it; `Err` only when the process stopped first.
    pub async fn record(
        &mut self,
        partition: i32,
        user: &str,
        key: &str,
        now_ms: i64,
        shutdown: &Shutdown,
    ) -> Result<(), LedgerError> {
        let entry = self
            .users
            .entry(user.to_string())
            .or_insert_with(|| (partition, UserPushes::default()));
        entry.0 = partition;
        entry.1.record(key, now_ms, self.horizon_ms);
        let payload = serde_json::to_vec(&entry.1).unwrap_or_default();
        self.since_expiry += 1;
        if self.since_expiry >= EXPIRE_EVERY {
            self.since_expiry = 0;
            self.expire(now_ms);
        }
        let (producer, topic) = (&self.producer, &self.topic);
        self.calls
            .run(shutdown, "push state write", || {
                let record = FutureRecord::to(topic)
                    .partition(partition)
                    .key(user)
                    .payload(&payload);
                async move {
                    producer
                        .send(record, Duration::from_secs(30))
                        .await
                        .map(|_| ())
                        .map_err(|(e, _)| e)
                }
            })
            .await
            .map_err(|_| LedgerError::Stopped)
    }
}

impl PushLedger {
    /// Forgets users whose last push is past the horizon, and writes a tombstone for each so
    /// that compaction drops their record: memory and the topic hold the recent users only.
    /// The tombstones are not waited for: one that is lost only keeps a record that a restore
    /// skips anyway.
    fn expire(&mut self, now_ms: i64) {
        let horizon_ms = self.horizon_ms;
        let expired: Vec<(String, i32)> = self
            .users
            .iter()
            .filter(|(_, (_, p))| p.expired(now_ms, horizon_ms))
            .map(|(user, (partition, _))| (user.clone(), *partition))
            .collect();
        for (user, partition) in &expired {
            self.users.remove(user);
            let tombstone = FutureRecord::<str, [u8]>::to(&self.topic)
                .partition(*partition)
                .key(user.as_str());
            if let Err((e, _)) = self.producer.send_result(tombstone) {
                tracing::debug!(error = %e, "tombstone not queued");
            }
        }
        if !expired.is_empty() {
            tracing::info!(users = expired.len(), "expired push state");
        }
    }
}

async fn partition_count(kafka: &KafkaArgs, topic: &str) -> Result<i32, LedgerError> {
    let (kafka, name) = (kafka.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = kafka.consumer_config("pulse-notifier-metadata").create()?;
        let md = consumer.fetch_metadata(Some(&name), Duration::from_secs(30))?;
        md.topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
            .ok_or(LedgerError::NoTriggersTopic(name))
    })
    .await
    .map_err(|_| LedgerError::Kafka(rdkafka::error::KafkaError::Canceled))?
}

/// Every record of one partition of the state topic, oldest first (`None`: a tombstone),
/// up to the high watermark it had when the read began. Ends at that offset, or when the
/// broker says the partition's end is reached; an error only if Kafka does not serve the
/// partition within a minute.
fn read_partition(
    kafka: &KafkaArgs,
    topic: &str,
    partition: i32,
) -> Result<Vec<(String, Option<UserPushes>)>, rdkafka::error::KafkaError> {
    let config = kafka.consumer_config("pulse-notifier-restore");
    let records = pulse_service::consumer::compacted::read_to_end(
        config,
        topic,
        partition,
        Duration::from_secs(60),
    )?;
    Ok(records
        .into_iter()
        .map(|(user, payload)| {
            let pushes = payload.and_then(|p| serde_json::from_slice(&p).ok());
            (user, pushes)
        })
        .collect())
}

/// Writes a tombstone into the state `topic` for each user key (`{partner_id}:{user}`, as
/// triggers are keyed) and waits for Kafka's acknowledgement, so that compaction drops the
/// erased people's pushes. A tombstone goes to the partition of its key by murmur2, the one
/// the user's triggers, and so their state records, are on (the state topic has the triggers
/// topic's partition count). Nothing to do when the topic does not exist. How many written.
pub async fn erase_users(
    kafka: &KafkaArgs,
    topic: &str,
    users: &[String],
) -> Result<usize, String> {
    let consumer: BaseConsumer = kafka.client_config().create().map_err(|e| e.to_string())?;
    let partitions = pulse_service::consumer::compacted::partitions_if_any(&consumer, topic)
        .map_err(|e| format!("reading {topic}: {e}"))?;
    if partitions == 0 || users.is_empty() {
        return Ok(0);
    }
    let producer: FutureProducer = kafka
        .producer_config()
        .create()
        .map_err(|e| e.to_string())?;
    let sends = users.iter().map(|user| {
        let partition = pulse_core::partitioner::partition_of(user.as_bytes(), partitions);
        let tombstone = FutureRecord::<str, [u8]>::to(topic)
            .partition(partition)
            .key(user.as_str());
        producer.send(tombstone, Duration::from_secs(30))
    });
    for sent in futures::future::join_all(sends).await {
        sent.map_err(|(e, _)| format!("writing to {topic}: {e}"))?;
    }
    Ok(users.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_s_record_keeps_at_most_its_cap_of_keys() {
        let mut p = UserPushes::default();
        for i in 0..(MAX_KEYS_PER_USER + 10) {
            p.record(&format!("k{i}"), 1_000, 3_600_000);
        }
        assert_eq!(p.delivered.len(), MAX_KEYS_PER_USER);
        assert_eq!(p.delivered[0].0, "k10", "the oldest go first");
    }

    #[test]
    fn a_user_s_record_forgets_deliveries_past_the_horizon() {
        let mut p = UserPushes::default();
        p.record("a", 1_000, 500);
        p.record("b", 1_400, 500);
        p.record("c", 1_600, 500);
        let keys: Vec<&str> = p.delivered.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "c"]);
        assert_eq!(p.last_push_ms, 1_600);
        assert!(!p.expired(2_000, 500));
        assert!(p.expired(2_100, 500));
        let json = serde_json::to_vec(&p).unwrap();
        assert_eq!(serde_json::from_slice::<UserPushes>(&json).unwrap(), p);
    }
}
