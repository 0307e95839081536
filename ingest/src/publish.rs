//! Writing events to Kafka and waiting for the acknowledgement of each.

use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pulse_core::kafka::KafkaArgs;
use pulse_core::Event;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::Timeout;
use rdkafka::ClientContext;
use tokio::sync::oneshot;

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

/// Acknowledgements of one request's events. librdkafka reports each event on its own; the
/// request waits once, for the last one, instead of polling a future per event.
struct BatchAcks {
    results: Mutex<Vec<Option<Result<Delivery, PublishError>>>>,
    remaining: AtomicUsize,
    done: Mutex<Option<oneshot::Sender<()>>>,
}

impl BatchAcks {
    fn record(&self, index: usize, result: Result<Delivery, PublishError>) {
        if let Some(slot) = self
            .results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(index)
        {
            *slot = Some(result);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(tx) = self.done.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = tx.send(());
            }
        }
    }
}

/// Routes librdkafka's delivery reports to the waiting request.
struct AckRouter;

impl ClientContext for AckRouter {}

impl ProducerContext for AckRouter {
    type DeliveryOpaque = Box<(Arc<BatchAcks>, usize)>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let (acks, index) = *opaque;
        let result = match result {
            Ok(m) => Ok(Delivery {
                partition: m.partition(),
                offset: m.offset(),
            }),
            Err((e, _)) => Err(PublishError::from_kafka(e)),
        };
        acks.record(index, result);
    }
}

/// The producer of the `events` topic, with the settings of [`KafkaArgs::producer_config`].
#[derive(Clone)]
pub struct EventPublisher {
    producer: Arc<ThreadedProducer<AckRouter>>,
    topic: String,
}

impl EventPublisher {
    pub fn new(kafka: &KafkaArgs, topic: &str) -> Result<Self, KafkaError> {
        Ok(Self {
            producer: Arc::new(kafka.producer_config().create_with_context(AckRouter)?),
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
        let (tx, rx) = oneshot::channel();
        let acks = Arc::new(BatchAcks {
            results: Mutex::new(vec![None; events.len()]),
            // One extra count, released after the loop, so an early failure cannot complete
            // the batch before every event was handed over.
            remaining: AtomicUsize::new(events.len() + 1),
            done: Mutex::new(Some(tx)),
        });
        for (index, event) in events.iter().enumerate() {
            let key = event.partition_key();
            let payload = event.to_canonical_json();
            let record = BaseRecord::with_opaque_to(&self.topic, Box::new((acks.clone(), index)))
                .key(&key)
                .payload(&payload);
            // send never blocks: a full local queue is an immediate error (503), so a slow
            // broker turns into back-pressure on clients rather than unbounded memory.
            if let Err((e, _record)) = self.producer.send(record) {
                tracing::warn!(error = %e, "enqueue to kafka failed");
                let error = match e.rdkafka_error_code() {
                    Some(RDKafkaErrorCode::QueueFull) => {
                        PublishError::Unavailable("local produce queue is full".into())
                    }
                    _ => PublishError::from_kafka(&e),
                };
                acks.record(index, Err(error));
            }
        }
        acks.record(
            usize::MAX,
            Ok(Delivery {
                partition: -1,
                offset: -1,
            }),
        );
        // The sender lives in `acks` until the last report: a closed channel means the
        // producer dropped reports (shutdown); such events count as unacknowledged below.
        let _ = rx.await;
        metrics::histogram!(crate::metrics::PRODUCE_LATENCY)
            .record(started.elapsed().as_secs_f64());
        let results = std::mem::take(&mut *acks.results.lock().unwrap_or_else(|p| p.into_inner()));
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(PublishError::Unavailable("producer shut down".into())))
            })
            .collect()
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
