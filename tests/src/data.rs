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

/// Identity records as the speed layer writes them (keyed by the profile each changes, with
/// the `pulse.identity` header), in order.
pub async fn produce_identities(topic: &str, records: &[pulse_core::identity::IdentityRecord]) {
    let producer: FutureProducer = KafkaArgs::with_brokers(brokers())
        .producer_config()
        .create()
        .expect("producer");
    for r in records {
        let headers = pulse_core::identity::IdentityRecord::headers();
        let (key, payload) = (r.key(), r.to_json());
        producer
            .send(
                FutureRecord::to(topic)
                    .key(&key)
                    .payload(&payload)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .expect("acked");
    }
}

/// Merges, as the speed layer would write them, of every other anonymous-only visitor of
/// `events` into a user of the same partner (so that the people counted differ from the
/// ids), each merge written twice (a copy after a crash), with a link and a refusal around
/// them that link nothing, and one device unlinked again; and the device → person map they
/// make, by (partner, device).
pub fn merges_for(
    events: &[Event],
) -> (
    Vec<pulse_core::identity::IdentityRecord>,
    std::collections::HashMap<(String, String), String>,
) {
    use pulse_core::identity::{IdentityRecord, Link, Merge, Position, Refusal, Unlink};
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    let mut devices: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut users: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in events {
        match (&e.user_id, &e.anonymous_id) {
            (Some(u), _) => users.entry(&e.partner_id).or_default().insert(u),
            (None, Some(a)) => devices.entry(&e.partner_id).or_default().insert(a),
            (None, None) => false,
        };
    }
    let at = chrono::DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).expect("now");
    let mut records = Vec::new();
    let mut map = HashMap::new();
    for (partner, devices) in &devices {
        let people: Vec<&&str> = users.get(partner).into_iter().flatten().collect();
        for (i, device) in devices.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
            let Some(person) = people.get(i % people.len().max(1)) else {
                continue;
            };
            let (partner, device, person) =
                (partner.to_string(), device.to_string(), person.to_string());
            let source = Position {
                partition: 0,
                offset: i as i64,
            };
            records.push(IdentityRecord::Link(Link {
                partner_id: partner.clone(),
                anonymous_id: device.clone(),
                user_id: person.clone(),
                linked_at: at,
                message_id: format!("login-{i}"),
                origin: source,
            }));
            let merge = IdentityRecord::Merge(Merge {
                partner_id: partner.clone(),
                anonymous_id: device.clone(),
                user_id: person.clone(),
                linked_at: at,
                source,
                profile: None,
            });
            records.push(merge.clone());
            records.push(merge);
            records.push(IdentityRecord::Refusal(Refusal {
                partner_id: partner.clone(),
                anonymous_id: device.clone(),
                user_id: format!("someone-else-{i}"),
                reason: "linked to another person".into(),
                source,
            }));
            map.insert((partner, device), person);
        }
    }
    // The first merged device is unlinked again by an operator (written twice, as two runs
    // of the unlink would): it counts as itself.
    if let Some(IdentityRecord::Merge(m)) = records.get(1).cloned() {
        let unlink = IdentityRecord::Unlink(Unlink {
            partner_id: m.partner_id.clone(),
            anonymous_id: m.anonymous_id.clone(),
            user_id: m.user_id.clone(),
            unlinked_at: at,
        });
        records.extend([unlink.clone(), unlink]);
        map.remove(&(m.partner_id, m.anonymous_id));
    }
    (records, map)
}
