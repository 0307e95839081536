//! The outbox against the real broker: a record is taken as delivered only once Kafka
//! acknowledged it, and a producer that failed for good stops the process instead of holding
//! it forever.

use std::time::Duration;

use pulse_core::kafka::KafkaArgs;
use pulse_service::outbox::{Outbox, OutboxError};
use pulse_service::Shutdown;
use pulse_tests::{brokers, create_topic, read_topic};
use rdkafka::message::OwnedHeaders;

#[tokio::test(flavor = "multi_thread")]
async fn a_fatal_producer_error_fails_the_confirm_and_stops_the_process() {
    let topic = create_topic("outbox-fatal", 1).await;
    let shutdown = Shutdown::new();
    let config = KafkaArgs::with_brokers(brokers()).producer_config();
    let outbox = Outbox::new(config, "test", shutdown.clone()).expect("outbox");

    outbox.send(&topic, b"k", b"first", OwnedHeaders::new());
    outbox
        .confirm(Duration::from_secs(30))
        .expect("a healthy producer confirms");
    assert!(outbox.fatal_error().is_none());

    outbox.inject_fatal_error("test: out of sequence");
    outbox.send(&topic, b"k", b"second", OwnedHeaders::new());
    let confirmed = outbox.confirm(Duration::from_secs(30));
    match confirmed {
        Err(OutboxError::Fatal(reason)) => assert!(reason.contains("out of sequence"), "{reason}"),
        other => panic!("expected a fatal error, got {other:?}"),
    }
    assert!(
        shutdown.is_stopped(),
        "a fatal producer error stops the process"
    );
    // Every later confirm says so too: nothing after it may be taken as delivered.
    assert!(matches!(
        outbox.confirm(Duration::from_secs(1)),
        Err(OutboxError::Fatal(_))
    ));

    assert_eq!(
        payloads_in(&topic),
        vec![b"first".to_vec()],
        "only the acknowledged record is in Kafka"
    );
}

/// The payloads in `topic`, read until one is in and a few seconds more (to see any other).
fn payloads_in(topic: &str) -> Vec<Vec<u8>> {
    read_topic(topic, 1, Duration::from_secs(3))
        .into_iter()
        .map(|m| m.payload)
        .collect()
}

/// The largest record a topic at the broker's default `max.message.bytes` (1,048,588) takes
/// whole, with a one-byte key: the batch and record framing take the rest.
const AS_LARGE_AS_THE_DEFAULT_TAKES: usize = 1_048_400;

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_of_a_record_as_large_as_its_source_allows_fits_a_provisioned_topic() {
    use pulse_core::kafka::{ensure_topics, TopicOutcome, TopicSpec};
    use pulse_service::outbox::{Source, DEAD_LETTER_MAX_BYTES};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let kafka = KafkaArgs::with_brokers(brokers());
    let source = create_topic("outbox-large-src", 1).await;
    // Random bytes: the producers compress (lz4), and a repetitive payload would shrink to a
    // few kilobytes and fit any topic.
    let payload: Vec<u8> = std::iter::repeat_with(|| *uuid::Uuid::new_v4().as_bytes())
        .flatten()
        .take(AS_LARGE_AS_THE_DEFAULT_TAKES)
        .collect();
    // The source topic (broker defaults) takes the record: a hostile or careless writer could
    // have put it there, and a consumer that cannot read it dead-letters it.
    let producer: FutureProducer = kafka
        .producer_config()
        .set("message.max.bytes", "2000000")
        .set("compression.type", "none")
        .create()
        .expect("producer");
    let offset = producer
        .send(
            FutureRecord::to(&source).key("k").payload(&payload),
            Duration::from_secs(30),
        )
        .await
        .expect("the source topic takes the record")
        .offset;

    // A dead-letter topic as pulse-admin provisions it takes the record beside its headers.
    let dlq = pulse_tests::unique("outbox-large-dlq");
    let spec = TopicSpec::new(&dlq, 1, 1).with_max_message_bytes(DEAD_LETTER_MAX_BYTES);
    let t = Duration::from_secs(30);
    ensure_topics(&kafka, std::slice::from_ref(&spec), t)
        .await
        .expect("create the dead-letter topic");
    let again = ensure_topics(&kafka, std::slice::from_ref(&spec), t)
        .await
        .expect("ensure again");
    assert!(
        matches!(&again[..], [TopicOutcome::Exists { .. }]),
        "a topic created with the limit has it: {again:?}"
    );
    let shutdown = Shutdown::new();
    let outbox = Outbox::new(kafka.producer_config(), "test", shutdown).expect("outbox");
    let from = Source {
        topic: &source,
        partition: 0,
        offset,
    };
    outbox.dead_letter(&dlq, from, b"k", &payload, "not an event", &[]);
    outbox
        .confirm(Duration::from_secs(30))
        .expect("the provisioned dead-letter topic takes the record and its headers");
    let stored = read_topic(&dlq, 1, Duration::from_secs(2));
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].payload, payload, "the payload as it was");
    assert_eq!(stored[0].header("pulse.error"), Some("not an event"));
    assert_eq!(
        stored[0].header("pulse.source.offset"),
        Some(offset.to_string().as_str())
    );

    // A dead-letter topic at the source's own limit cannot take it: the record is kept, the
    // confirm says what to raise, and ensure reports the topic as undersized.
    let small = create_topic("outbox-large-small", 1).await;
    outbox.dead_letter(&small, from, b"k", &payload, "not an event", &[]);
    match outbox.confirm(Duration::from_secs(30)) {
        Err(e @ OutboxError::Refused { .. }) => {
            let message = e.to_string();
            assert!(message.contains("max.message.bytes"), "{message}");
            assert!(message.contains(&small), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let spec = TopicSpec::new(&small, 1, 1).with_max_message_bytes(DEAD_LETTER_MAX_BYTES);
    let outcomes = ensure_topics(&kafka, &[spec], t).await.expect("ensure");
    assert!(
        matches!(
            &outcomes[..],
            [TopicOutcome::Undersized { max_message_bytes, want, .. }]
                if *max_message_bytes < *want && *want == DEAD_LETTER_MAX_BYTES
        ),
        "{outcomes:?}"
    );
}

/// A topic that refuses every record: what Kafka refused is kept to be sent again, and once
/// it reaches `MAX_UNDELIVERED_BYTES` the outbox says it is full (its consumer stops reading,
/// so memory does not grow with every record read meanwhile); once the topic takes them they
/// are all delivered and the outbox is not full any more.
#[tokio::test(flavor = "multi_thread")]
async fn refused_records_fill_the_outbox_until_the_topic_takes_them() {
    use pulse_service::outbox::MAX_UNDELIVERED_BYTES;
    let topic = create_topic("outbox-full", 1).await;
    pulse_tests::set_topic_config(&topic, "max.message.bytes", "64").await;
    let outbox = Outbox::new(
        KafkaArgs::with_brokers(brokers()).producer_config(),
        "test",
        Shutdown::new(),
    )
    .expect("outbox");
    let record = vec![b'x'; 1 << 20];
    let count = MAX_UNDELIVERED_BYTES / record.len() + 1;
    for _ in 0..count {
        outbox.send(&topic, b"k", &record, OwnedHeaders::new());
    }
    assert!(matches!(
        outbox.confirm(Duration::from_secs(60)),
        Err(OutboxError::Refused { .. })
    ));
    assert!(
        outbox.is_full(),
        "{count} refused records of 1 MiB are kept"
    );

    pulse_tests::set_topic_config(&topic, "max.message.bytes", "2097152").await;
    outbox
        .confirm(Duration::from_secs(60))
        .expect("the topic takes them now");
    assert!(!outbox.is_full());
    assert_eq!(
        read_topic(&topic, count, Duration::from_secs(1)).len(),
        count
    );
}

/// An ordered outbox (identity records, read behind a high-water mark) delivers in order or
/// not at all: a record refused for its size fails it for good, nothing sent after it reaches
/// Kafka (it would overtake the refused one), and the process stops without committing.
#[tokio::test(flavor = "multi_thread")]
async fn an_ordered_outbox_sends_nothing_after_a_refused_record_and_stops() {
    let topic = create_topic("outbox-ordered", 1).await;
    let shutdown = Shutdown::new();
    // A producer limit below the second record: refused at once, before any broker saw it.
    let mut config = KafkaArgs::with_brokers(brokers()).producer_config();
    config.set("message.max.bytes", "20000");
    config.set("compression.type", "none");
    let outbox = Outbox::ordered(config, "test", shutdown.clone()).expect("outbox");
    outbox.send(&topic, b"k", b"first", OwnedHeaders::new());
    outbox
        .confirm(Duration::from_secs(30))
        .expect("a healthy ordered outbox confirms");
    let large: Vec<u8> = std::iter::repeat_with(|| *uuid::Uuid::new_v4().as_bytes())
        .flatten()
        .take(40_000)
        .collect();
    outbox.send(&topic, b"k", &large, OwnedHeaders::new());
    assert!(
        shutdown.is_stopped(),
        "the refusal stops the process at once"
    );
    outbox.send(&topic, b"k", b"third", OwnedHeaders::new());
    match outbox.confirm(Duration::from_secs(10)) {
        Err(OutboxError::Fatal(reason)) => assert!(reason.contains("ordered record"), "{reason}"),
        other => panic!("expected the ordered outbox to have failed for good, got {other:?}"),
    }
    assert_eq!(
        payloads_in(&topic),
        vec![b"first".to_vec()],
        "the third did not overtake the second"
    );
}
