//! Writing events to Kafka and waiting for the acknowledgement of each.

use std::time::{Duration, Instant};

use futures::future::join_all;
use pulse_core::kafka::KafkaArgs;
use pulse_core::Event;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

/// Where Kafka stored an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub partition: i32,
    pub offset: i64,
}

/// Why Kafka did not acknowledge an event.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The broker could not be reached or did not acknowledge in time. The client should retry.
    #[error("kafka unavailable: {0}")]
    Unavailable(String),
    /// Kafka refused the record itself (too large for the topic, say); retrying will not help.
    #[error("kafka rejected the event: {0}")]
    Rejected(String),
}

impl PublishError {
    fn from_kafka(e: &KafkaError) -> Self {
        match e.rdkafka_error_code() {
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidMessage,
            ) => Self::Rejected(e.to_string()),
            _ => Self::Unavailable(e.to_string()),
        }
    }
}

/// The producer of the `events` topic, with the settings of [`KafkaArgs::producer_config`].
#[derive(Clone)]
pub struct EventPublisher {
    producer: FutureProducer,
    topic: String,
}

impl EventPublisher {
    pub fn new(kafka: &KafkaArgs, topic: &str) -> Result<Self, KafkaError> {
        Ok(Self {
            producer: kafka.producer_config().create()?,
            topic: topic.to_string(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes all events and waits until each is acknowledged or failed. Results are in input
    /// order. All records are enqueued before any is awaited, so a batch costs one round trip.
    pub async fn publish(&self, events: &[Event]) -> Vec<Result<Delivery, PublishError>> {
        let started = Instant::now();
        let mut pending = Vec::with_capacity(events.len());
        for event in events {
            let key = event.partition_key();
            let payload = event.to_canonical_json();
            let record = FutureRecord::to(&self.topic).key(&key).payload(&payload);
            // send_result never blocks: a full local queue is an immediate error (503), so a
            // slow broker turns into back-pressure on clients rather than unbounded memory.
            pending.push(match self.producer.send_result(record) {
                Ok(delivery) => Some(delivery),
                Err((e, _)) => {
                    tracing::warn!(error = %e, "enqueue to kafka failed");
                    None
                }
            });
        }
        let results = join_all(pending.into_iter().map(|p| async move {
            let Some(future) = p else {
                return Err(PublishError::Unavailable(
                    "local produce queue is full".into(),
                ));
            };
            match future.await {
                Ok(Ok(d)) => Ok(Delivery {
                    partition: d.partition,
                    offset: d.offset,
                }),
                Ok(Err((e, _))) => Err(PublishError::from_kafka(&e)),
                Err(_cancelled) => Err(PublishError::Unavailable("producer shut down".into())),
            }
        }))
        .await;
        metrics::histogram!(crate::metrics::PRODUCE_LATENCY)
            .record(started.elapsed().as_secs_f64());
        results
    }

    /// Whether Kafka answers metadata for our topic within `timeout`. Blocking: call it from
    /// a blocking thread.
    pub fn check_topic(&self, timeout: Duration) -> Result<usize, String> {
        let md = self
            .producer
            .client()
            .fetch_metadata(Some(&self.topic), timeout)
            .map_err(|e| e.to_string())?;
        let topic = md
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .ok_or_else(|| format!("topic {} not in metadata", self.topic))?;
        if let Some(err) = topic.error() {
            return Err(format!("topic {}: {:?}", self.topic, err));
        }
        Ok(topic.partitions().len())
    }

    /// Waits for everything in flight to be acknowledged (graceful shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(Timeout::After(timeout))
    }
}
