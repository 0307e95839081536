//! The devices an operator unlinked from the person they had been merged into
//! (`pulse-speed identities unlink`; the record is `pulse_core::identity::Unlink`). Kept in
//! the compacted `--unlinks-topic`, read to its end by every process that folds profiles
//! before it folds anything, so that the live layer, a recompute and the unlink's own refold
//! apply the same rule from the beginning of history (see `engine::identity`).

use std::collections::HashMap;
use std::time::Duration;

use pulse_core::event::partition_key;
use pulse_core::identity::{IdentityRecord, Unlink};
use pulse_core::kafka::KafkaArgs;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// The unlinked devices, by device profile id (`partner:anonymous_id`).
#[derive(Debug, Clone, Default)]
pub struct Unlinks {
    by_device: HashMap<String, Unlink>,
}

impl Unlinks {
    /// Whether the device `anonymous_id` of `partner` was unlinked. Free when none was (the
    /// usual case): no key is built.
    pub fn contains(&self, partner: &str, anonymous_id: &str) -> bool {
        !self.by_device.is_empty()
            && self
                .by_device
                .contains_key(&partition_key(partner, anonymous_id))
    }

    /// The unlink of the device profile `id`.
    pub fn get(&self, id: &str) -> Option<&Unlink> {
        self.by_device.get(id)
    }

    pub fn len(&self) -> usize {
        self.by_device.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_device.is_empty()
    }

    /// Adds one (what `load` would read back).
    pub fn insert(&mut self, unlink: Unlink) {
        self.by_device.insert(unlink.key(), unlink);
    }

    /// Every unlink in `topic`, read to its end; none when the topic does not exist yet.
    /// A record that does not decode is logged and passed over: it cannot be applied, and
    /// refusing to start would stop every partner's profiles for one bad record.
    pub fn load(kafka: &KafkaArgs, topic: &str) -> Result<Self, KafkaError> {
        let consumer: BaseConsumer = kafka.client_config().create()?;
        let partitions = pulse_service::consumer::compacted::partitions_if_any(&consumer, topic)?;
        let mut out = Self::default();
        for partition in 0..partitions {
            let config = kafka.consumer_config("pulse-unlinks-restore");
            let records = pulse_service::consumer::compacted::read_to_end(
                config,
                topic,
                partition,
                Duration::from_secs(60),
            )?;
            for (key, payload) in records {
                match payload.map(|p| serde_json::from_slice::<Unlink>(&p)) {
                    Some(Ok(unlink)) => out.insert(unlink),
                    // A tombstone: the unlink was withdrawn.
                    None => {
                        out.by_device.remove(&key);
                    }
                    Some(Err(e)) => {
                        tracing::error!(topic, key, error = %e, "an unlink record that does not decode is passed over")
                    }
                }
            }
        }
        if !out.is_empty() {
            tracing::info!(topic, unlinks = out.len(), "unlinked devices loaded");
        }
        Ok(out)
    }

    /// Writes `unlink` to `topic` (created compacted when missing) and waits for Kafka's
    /// acknowledgement.
    pub async fn record(kafka: &KafkaArgs, topic: &str, unlink: &Unlink) -> Result<(), String> {
        let payload = serde_json::to_vec(unlink).unwrap_or_default();
        pulse_service::consumer::compacted::record(kafka, topic, &[(unlink.key(), payload)]).await
    }

    /// Writes `unlink` into the events topic too, as an identity record keyed by the device,
    /// so that the archive keeps it beside the merge it undoes (the warehouse's `identities`
    /// leave the device out). Written by every run of an unlink: a copy is harmless.
    pub async fn announce(kafka: &KafkaArgs, events: &str, unlink: &Unlink) -> Result<(), String> {
        let record = IdentityRecord::Unlink(unlink.clone());
        let headers = IdentityRecord::headers();
        let (key, payload) = (record.key(), record.to_json());
        let record = FutureRecord::to(events)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        send(kafka, record).await
    }
}

/// Sends one record and waits for Kafka's acknowledgement.
async fn send(kafka: &KafkaArgs, record: FutureRecord<'_, String, Vec<u8>>) -> Result<(), String> {
    let producer: FutureProducer = kafka
        .producer_config()
        .create()
        .map_err(|e| e.to_string())?;
    let topic = record.topic.to_string();
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(e, _)| format!("writing to {topic}: {e}"))
}
