//! Baseline for `bench/speed` and `bench/archive`: read every record of a topic from the
//! beginning and JSON-parse it into the canonical event, nothing else. Prints events/s, the
//! distinct keys (users) seen, and the bytes of JSON read.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use clap::Parser;
use pulse_core::kafka::KafkaArgs;
use pulse_core::Event;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[arg(long)]
    topic: String,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut config = a
        .kafka
        .consumer_config(&format!("raw-consume-{}", std::process::id()));
    config.set("enable.partition.eof", "true");
    let consumer: BaseConsumer = config.create()?;
    let md = consumer.fetch_metadata(Some(&a.topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    let mut partitions = 0;
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(&a.topic, p.id(), Offset::Beginning)?;
            partitions += 1;
        }
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let (mut events, mut bytes, mut bad) = (0u64, 0u64, 0u64);
    let mut keys: HashSet<Vec<u8>> = HashSet::new();
    let mut ended = HashSet::new();
    while ended.len() < partitions {
        match consumer.poll(Duration::from_secs(5)) {
            Some(Ok(m)) => {
                let payload = m.payload().unwrap_or_default();
                bytes += payload.len() as u64;
                match Event::from_canonical_json(payload) {
                    Ok(_) => events += 1,
                    Err(_) => bad += 1,
                }
                if let Some(k) = m.key() {
                    if !keys.contains(k) {
                        keys.insert(k.to_vec());
                    }
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                ended.insert(p);
            }
            Some(Err(e)) => anyhow::bail!("consume: {e}"),
            None => anyhow::bail!("no records for 5 s before the end of the topic"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "events": events, "unparseable": bad, "json_bytes": bytes, "distinct_keys": keys.len(),
            "elapsed_secs": elapsed, "events_per_sec": events as f64 / elapsed,
        })
    );
    Ok(())
}
