//! Baseline for `bench/triggers`: the round trip of one small record through Kafka with
//! Pulse's producer and consumer settings (produce with acks=all, then consume it), every
//! `--interval-ms`, for `--duration-secs`. A push crosses Kafka twice (events, triggers), so
//! this is the floor under each hop on the same broker under the same load. Prints the round
//! trips in milliseconds as JSON.

use std::time::{Duration, Instant};

use clap::Parser;
use pulse_core::kafka::KafkaArgs;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[arg(long)]
    topic: String,
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let admin: AdminClient<DefaultClientContext> = a.kafka.client_config().create()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let topic = NewTopic::new(&a.topic, 1, TopicReplication::Fixed(1));
    // An existing topic is fine: the consumer starts at its end.
    let _ = runtime.block_on(admin.create_topics([&topic], &AdminOptions::new()))?;

    let producer: BaseProducer = a.kafka.producer_config().create()?;
    let consumer: BaseConsumer = a
        .kafka
        .consumer_config(&format!("raw-roundtrip-{}", std::process::id()))
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&a.topic, 0, Offset::End)?;
    consumer.assign(&tpl)?;
    // Let the assignment settle before the first probe, so it does not count the start.
    let _ = consumer.poll(Duration::from_secs(2));

    let started = Instant::now();
    let mut round_trips = Vec::new();
    let interval = Duration::from_millis(a.interval_ms);
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(a.duration_secs) {
        let t0 = Instant::now();
        let key = sent.to_string();
        producer
            .send(BaseRecord::to(&a.topic).key(&key).payload(&key))
            .map_err(|(e, _)| e)?;
        sent += 1;
        let deadline = t0 + Duration::from_secs(10);
        loop {
            producer.poll(Duration::ZERO);
            match consumer.poll(Duration::from_millis(1)) {
                Some(Ok(m)) if m.key() == Some(key.as_bytes()) => {
                    round_trips.push(t0.elapsed().as_secs_f64() * 1000.0);
                    break;
                }
                Some(Err(e)) => anyhow::bail!("consume failed: {e}"),
                _ if Instant::now() > deadline => anyhow::bail!("probe {key} not back in 10 s"),
                _ => {}
            }
        }
        if let Some(rest) = interval.checked_sub(t0.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    producer.flush(Duration::from_secs(10))?;
    println!(
        "{}",
        serde_json::json!({ "probes": sent, "round_trips_ms": round_trips })
    );
    Ok(())
}
