//! Reading a compacted topic's partition from its beginning to its end: the state a process
//! restores before it starts (the notifier's push ledger, the identity unlinks).

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// A record of a compacted topic: its key, and its payload (`None` for a tombstone).
pub type KeyedRecord = (String, Option<Vec<u8>>);

/// The records of `partition` of `topic`, oldest first, as (key, payload: `None` for a
/// tombstone), up to the end it had when the read began. `config` is a consumer's (no group
/// membership is used: the partition is assigned, nothing is committed). Gives up with
/// `NoMessageReceived` when the end is not reached within `patience`.
pub fn read_to_end(
    mut config: ClientConfig,
    topic: &str,
    partition: i32,
    patience: Duration,
) -> Result<Vec<KeyedRecord>, KafkaError> {
    config
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true");
    let consumer: BaseConsumer = config.create()?;
    let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(30))?;
    let mut out = Vec::new();
    if high <= low {
        return Ok(out);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + patience;
    loop {
        match consumer.poll(Duration::from_secs(1)) {
            Some(Ok(m)) => {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                out.push((key, m.payload().map(<[u8]>::to_vec)));
                if m.offset() + 1 >= high {
                    return Ok(out);
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(out),
            Some(Err(e)) => {
                tracing::warn!(error = %e, topic, partition, "reading a compacted topic")
            }
            None => {}
        }
        if Instant::now() > deadline {
            return Err(KafkaError::NoMessageReceived);
        }
    }
}

/// How many partitions `topic` has; 0 when it does not exist (a compacted topic of decisions
/// none was ever made of: no unlink, no erasure). Any other metadata error is an error: a
/// process must not start without state it cannot read (for want of access, say).
pub fn partitions_if_any(consumer: &BaseConsumer, topic: &str) -> Result<i32, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    match metadata.topics().iter().find(|t| t.name() == topic) {
        None => Ok(0),
        Some(t) => match t.error().map(RDKafkaErrorCode::from) {
            None => Ok(t.partitions().len() as i32),
            Some(RDKafkaErrorCode::UnknownTopicOrPartition) => Ok(0),
            Some(code) => Err(KafkaError::MetadataFetch(code)),
        },
    }
}

/// Writes `records` (key, payload) to the compacted `topic`, created with one partition when
/// missing (`pulse-admin topics ensure` creates it replicated), and waits for Kafka's
/// acknowledgement of every one: a decision (an unlink, an erasure) counts once it is there.
pub async fn record(
    kafka: &pulse_core::kafka::KafkaArgs,
    topic: &str,
    records: &[(String, Vec<u8>)],
) -> Result<(), String> {
    use pulse_core::kafka::{ensure_topics, TopicSpec};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let spec = TopicSpec::compacted(topic, 1, 1);
    ensure_topics(kafka, &[spec], Duration::from_secs(30))
        .await
        .map_err(|e| format!("creating {topic}: {e}"))?;
    let producer: FutureProducer = kafka
        .producer_config()
        .create()
        .map_err(|e| e.to_string())?;
    let sends = records.iter().map(|(key, payload)| {
        producer.send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(30),
        )
    });
    for sent in futures::future::join_all(sends).await {
        sent.map_err(|(e, _)| format!("writing to {topic}: {e}"))?;
    }
    Ok(())
}
