//! Reading a compacted topic's partition from its beginning to its end: the state a process
//! restores before it starts (the notifier's push ledger, the identity unlinks).

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
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
