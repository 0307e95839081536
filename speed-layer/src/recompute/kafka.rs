//! The Kafka side of a recompute: the topic's partitions and retained offsets, where a group
//! has committed, and whether a group has members.

use std::collections::BTreeMap;
use std::time::Duration;

use pulse_core::kafka::KafkaArgs;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Per partition: the first offset Kafka still holds and the next one it will write.
#[derive(Debug, Clone, Default)]
pub struct Retained {
    pub low: BTreeMap<i32, i64>,
    pub high: BTreeMap<i32, i64>,
}

impl Retained {
    pub fn partitions(&self) -> Vec<i32> {
        self.low.keys().copied().collect()
    }
}

/// The partitions of `topic` and the offsets each retains.
pub fn retained(kafka: &KafkaArgs, topic: &str) -> Result<Retained, KafkaError> {
    let consumer: BaseConsumer = kafka.client_config().create()?;
    let md = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let mut out = Retained::default();
    for t in md.topics() {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), TIMEOUT)?;
            out.low.insert(p.id(), low);
            out.high.insert(p.id(), high);
        }
    }
    Ok(out)
}

/// Where `group` has committed on each of `partitions` (the next offset it reads); partitions
/// it never committed are absent. Read without joining the group.
pub fn committed(
    kafka: &KafkaArgs,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, i64>, KafkaError> {
    let consumer: BaseConsumer = kafka.consumer_config(group).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, *p);
    }
    let got = consumer.committed_offsets(tpl, TIMEOUT)?;
    Ok(got
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

/// How many members `group` has now (0 when it is empty or unknown).
pub fn members(kafka: &KafkaArgs, group: &str) -> Result<usize, KafkaError> {
    let consumer: BaseConsumer = kafka.client_config().create()?;
    let list = consumer.fetch_group_list(Some(group), TIMEOUT)?;
    Ok(list
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .map(|g| g.members().len())
        .sum())
}

/// Commits `positions` (partition, next offset) for `group` without joining it.
pub fn commit(
    kafka: &KafkaArgs,
    group: &str,
    topic: &str,
    positions: &[(i32, i64)],
) -> Result<(), KafkaError> {
    if positions.is_empty() {
        return Ok(());
    }
    let consumer: BaseConsumer = kafka.consumer_config(group).create()?;
    let tpl = pulse_service::consumer::commit_list(topic, positions.iter().copied());
    consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync)
}
