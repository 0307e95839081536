//! Test data: generated clickstream as canonical events, and writing records to Kafka.

use std::time::Duration;

use chrono::Utc;
use pulse_core::kafka::KafkaArgs;
use pulse_core::{parse_event, Event, ParseContext};
use pulse_loadgen::{Clickstream, ClickstreamConfig, Partner};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::brokers;

/// Generated clickstream as canonical events, timestamps spread over the last `days` days so
/// the 7-day model differs from the all-time one.
pub fn generate(n: usize, seed: u64, users: u64, days: i64) -> Vec<Event> {
    let partners = vec![
        Partner {
            id: "shop-a".into(),
            key: "ka".into(),
        },
        Partner {
            id: "shop-b".into(),
            key: "kb".into(),
        },
    ];
    let stream = Clickstream::new(ClickstreamConfig {
        partners,
        users,
        zipf_exponent: 1.05,
        concurrent_sessions: 64,
        seed,
        login_share: 0.0,
    });
    let now = Utc::now().timestamp_millis();
    let ctx = ParseContext::now();
    stream
        .take(n)
        .enumerate()
        .map(|(i, g)| {
            let mut v = g.event;
            // Deterministic spread: event i is (i * 7919) mod `days` days old.
            let age_days = ((i as i64) * 7919) % days.max(1);
            v["timestamp"] = serde_json::json!(now - age_days * 86_400_000 - (i as i64 % 1000));
            parse_event(&v.to_string(), &ctx).expect("generated event")
        })
        .collect()
}

/// Writes events to `topic` keyed as ingest does.
pub async fn produce(topic: &str, events: &[Event]) {
    let producer: FutureProducer = KafkaArgs::with_brokers(brokers())
        .producer_config()
        .create()
        .expect("producer");
    let mut pending = Vec::with_capacity(events.len());
    for e in events {
        let key = e.partition_key();
        let payload = e.to_canonical_json();
        pending.push(
            producer
                .send_result(FutureRecord::to(topic).key(&key).payload(&payload))
                .expect("enqueue"),
        );
    }
    for p in pending {
        p.await.expect("delivery").expect("acked");
    }
}

/// Raw records (for malformed input).
pub async fn produce_raw(topic: &str, records: &[(Option<&str>, &[u8])]) {
    let producer: FutureProducer = KafkaArgs::with_brokers(brokers())
        .producer_config()
        .create()
        .expect("producer");
    for (key, payload) in records {
        let mut r = FutureRecord::<str, [u8]>::to(topic).payload(payload);
        if let Some(k) = key {
            r = r.key(k);
        }
        producer
            .send(r, Duration::from_secs(30))
            .await
            .expect("acked");
    }
}

/// One record to a chosen partition, whatever its key hashes to (as another producer's
/// partitioner, or a partition chosen explicitly, would put it).
pub async fn produce_to_partition(topic: &str, partition: i32, key: &str, payload: &[u8]) {
    let producer: FutureProducer = KafkaArgs::with_brokers(brokers())
        .producer_config()
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::to(topic)
                .partition(partition)
                .key(key)
                .payload(payload),
            Duration::from_secs(30),
        )
        .await
        .expect("acked");
}
