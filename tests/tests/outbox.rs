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

    let stored: Vec<Vec<u8>> = read_topic(&topic, 1, Duration::from_secs(3))
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(
        stored,
        vec![b"first".to_vec()],
        "only the acknowledged record is in Kafka"
    );
}
