//! The erasures topic, followed for as long as a process runs (see `pulse_core::erasure`).
//!
//! A process starts an [`ErasureFeed`] before it takes anything, waits until the topic was
//! read to the end it had ([`ErasureFeed::wait_loaded`]; ingest answers 503 until then), and
//! from then on sees each new erasure within about a poll (half a second) of Kafka
//! acknowledging it: a thread of the feed's own reads every partition of the topic from its
//! beginning and goes on reading. A topic that does not exist yet means that nothing was ever
//! erased; the thread looks for it again every few seconds, so the first erasure (whose
//! command creates the topic) reaches processes started before it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, Weak};
use std::time::{Duration, Instant};

use pulse_core::erasure::{Erasure, Erasures};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::consumer::compacted::partitions_if_any;

/// Metric: the ids a process knows to be erased.
pub const ERASED_IDS: &str = "pulse_erased_ids";

/// How long a process waits to have read the erasures topic before it gives up starting: it
/// must not take anything it cannot check.
pub const LOAD_PATIENCE: Duration = Duration::from_secs(60);

/// How often a waiter looks whether the topic was read.
const LOAD_POLL: Duration = Duration::from_millis(20);

/// How often a missing erasures topic is looked for again.
const TOPIC_RECHECK: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(
        "the erasures topic {topic} was not read to its end within {secs} s; a process that \
         does not know who was erased must not take anything"
    )]
    NotLoaded { topic: String, secs: u64 },
}

/// The erasures a process knows, kept current by a thread of its own. Cheap to clone; the
/// thread ends when the last clone is dropped.
#[derive(Clone)]
pub struct ErasureFeed {
    inner: Arc<Inner>,
}

struct Inner {
    topic: String,
    erasures: RwLock<Erasures>,
    /// Set once the topic was read to the end it had when the feed started.
    loaded: std::sync::atomic::AtomicBool,
}

impl ErasureFeed {
    /// Starts following `topic` with a consumer made from `config` (no group: every partition
    /// is assigned, nothing is committed). Returns at once.
    pub fn follow(config: ClientConfig, topic: &str) -> Self {
        let feed = Self::with(Erasures::default(), topic, false);
        let weak = Arc::downgrade(&feed.inner);
        let topic = topic.to_string();
        let spawned = std::thread::Builder::new()
            .name("erasures".into())
            .spawn(move || follow(weak, config, &topic));
        if let Err(e) = spawned {
            // Never loaded: the process reports it (wait_loaded, ingest's 503) instead of
            // taking records it cannot check.
            tracing::error!(error = %e, "starting the erasures thread failed");
        }
        feed
    }

    /// A feed of a fixed set that is never updated: for a unit test, or a one-shot reader
    /// given its erasures.
    pub fn fixed(erasures: Erasures) -> Self {
        Self::with(erasures, "", true)
    }

    fn with(erasures: Erasures, topic: &str, loaded: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                topic: topic.to_string(),
                erasures: RwLock::new(erasures),
                loaded: loaded.into(),
            }),
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.inner.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    /// [`ErasureFeed::follow`], then blocks until the topic was read to its end (for at most
    /// [`LOAD_PATIENCE`]): what a process does before it takes anything.
    pub fn follow_loaded(config: ClientConfig, topic: &str) -> Result<Self, FeedError> {
        let feed = Self::follow(config, topic);
        feed.wait_loaded(LOAD_PATIENCE)?;
        Ok(feed)
    }

    /// Blocks until the topic was read to its end, for at most `patience`.
    pub fn wait_loaded(&self, patience: Duration) -> Result<(), FeedError> {
        let deadline = Instant::now() + patience;
        while !self.is_loaded() {
            self.check_deadline(deadline, patience)?;
            std::thread::sleep(LOAD_POLL);
        }
        Ok(())
    }

    /// [`ErasureFeed::wait_loaded`] for async code: waits without holding a runtime thread.
    pub async fn loaded(&self, patience: Duration) -> Result<(), FeedError> {
        let deadline = Instant::now() + patience;
        while !self.is_loaded() {
            self.check_deadline(deadline, patience)?;
            tokio::time::sleep(LOAD_POLL).await;
        }
        Ok(())
    }

    fn check_deadline(&self, deadline: Instant, patience: Duration) -> Result<(), FeedError> {
        match Instant::now() >= deadline {
            true => Err(FeedError::NotLoaded {
                topic: self.inner.topic.clone(),
                secs: patience.as_secs(),
            }),
            false => Ok(()),
        }
    }

    /// The erasures known now. Hold the guard briefly: the feed's thread waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, Erasures> {
        // A panic while the lock was held leaves a set that is still whole: read it anyway.
        self.inner
            .erasures
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds erasures as the thread would (a test, or the command that just wrote them).
    pub fn insert(&self, erasure: &Erasure) {
        self.inner.apply(&erasure.key(), Some(erasure));
    }
}

impl Inner {
    fn apply(&self, key: &str, erasure: Option<&Erasure>) {
        let mut set = self
            .erasures
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match erasure {
            Some(e) => {
                set.insert(&e.partner_id, &e.id);
            }
            None => set.withdraw(key),
        }
        metrics::gauge!(ERASED_IDS).set(set.len() as f64);
    }

    fn set_loaded(&self) {
        if !self.loaded.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let n = self.erasures.read().map(|s| s.len()).unwrap_or_default();
            tracing::info!(topic = %self.topic, erased_ids = n, "erasures loaded");
        }
    }
}

/// The feed's thread: until the feed is dropped, reads every partition of `topic` from its
/// beginning and applies each record.
fn follow(feed: Weak<Inner>, mut config: ClientConfig, topic: &str) {
    config
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true");
    let consumer: BaseConsumer = match config.create() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the erasures consumer cannot be made; never loaded");
            return;
        }
    };
    // Partition → the end it had at the start; emptied as each is read to it.
    let mut unread: Option<HashMap<i32, i64>> = None;
    let mut last_warning = Instant::now()
        .checked_sub(Duration::from_secs(60))
        .unwrap_or_else(Instant::now);
    loop {
        let Some(inner) = feed.upgrade() else {
            return;
        };
        if unread.is_none() {
            match start(&consumer, topic) {
                Ok(Some(ends)) => unread = Some(ends),
                Ok(None) => {
                    // No topic: nothing was ever erased. Look again in a while.
                    inner.set_loaded();
                    drop(inner);
                    std::thread::sleep(TOPIC_RECHECK);
                    continue;
                }
                Err(e) => {
                    if last_warning.elapsed() > Duration::from_secs(30) {
                        last_warning = Instant::now();
                        tracing::warn!(topic, error = %e, "reading the erasures topic; trying again");
                    }
                    drop(inner);
                    std::thread::sleep(TOPIC_RECHECK);
                    continue;
                }
            }
        }
        let ends = unread.get_or_insert_with(HashMap::new);
        if ends.is_empty() {
            inner.set_loaded();
        }
        let read_to = |ends: &mut HashMap<i32, i64>, partition: i32, next: i64| {
            if ends.get(&partition).is_some_and(|end| next >= *end) {
                ends.remove(&partition);
            }
        };
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                match m.payload().map(serde_json::from_slice::<Erasure>) {
                    Some(Ok(erasure)) => inner.apply(&key, Some(&erasure)),
                    None => inner.apply(&key, None),
                    Some(Err(e)) => tracing::error!(
                        topic, key, error = %e,
                        "an erasure record that does not decode is passed over"
                    ),
                }
                read_to(ends, m.partition(), m.offset() + 1);
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                ends.remove(&p);
            }
            Some(Err(e)) if last_warning.elapsed() > Duration::from_secs(30) => {
                last_warning = Instant::now();
                tracing::warn!(topic, error = %e, "reading the erasures topic");
            }
            Some(Err(_)) | None => {}
        }
        if ends.is_empty() {
            inner.set_loaded();
        }
    }
}

/// Assigns every partition of `topic` from its beginning: the end each had (partitions
/// already empty left out), or `None` when there is no such topic.
fn start(consumer: &BaseConsumer, topic: &str) -> Result<Option<HashMap<i32, i64>>, KafkaError> {
    let partitions = partitions_if_any(consumer, topic)?;
    if partitions == 0 {
        return Ok(None);
    }
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if high > low {
            ends.insert(p, high);
        }
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok(Some(ends))
}

/// Writes `erasures` to `topic` (created compacted when missing) and waits for Kafka's
/// acknowledgement of each: from then on every process that follows the topic drops them.
pub async fn record(
    kafka: &pulse_core::kafka::KafkaArgs,
    topic: &str,
    erasures: &[Erasure],
) -> Result<(), String> {
    let records: Vec<(String, Vec<u8>)> = erasures.iter().map(|e| (e.key(), e.to_json())).collect();
    crate::consumer::compacted::record(kafka, topic, &records).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_feed_is_loaded_and_takes_inserts() {
        let feed = ErasureFeed::fixed(Erasures::default());
        assert!(feed.wait_loaded(Duration::ZERO).is_ok());
        feed.insert(&Erasure {
            partner_id: "p1".into(),
            id: "u1".into(),
            kind: pulse_core::erasure::IdKind::User,
            request_id: "r".into(),
            requested_at: chrono::Utc::now(),
        });
        assert!(feed.read().contains("p1", "u1"));
        assert_eq!(feed.clone().read().len(), 1, "clones share the set");
    }
}
