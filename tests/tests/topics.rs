//! Topic provisioning against the real broker.

use std::time::Duration;

use pulse_core::kafka::{ensure_topics, KafkaArgs, TopicError, TopicOutcome, TopicSpec};
use pulse_tests::{brokers, unique};

#[tokio::test]
async fn ensure_is_idempotent_and_refuses_partition_changes() {
    let kafka = KafkaArgs::with_brokers(brokers());
    let name = unique("it-topics");
    let spec = |partitions| TopicSpec::new(&name, partitions, 1);
    let t = Duration::from_secs(30);

    let first = ensure_topics(&kafka, &[spec(6)], t).await.unwrap();
    assert_eq!(
        first,
        vec![TopicOutcome::Created {
            name: name.clone(),
            partitions: 6
        }]
    );
    let again = ensure_topics(&kafka, &[spec(6)], t).await.unwrap();
    assert_eq!(
        again,
        vec![TopicOutcome::Exists {
            name: name.clone(),
            partitions: 6
        }]
    );

    match ensure_topics(&kafka, &[spec(12)], t).await {
        Err(TopicError::TooFewPartitions {
            have: 6, want: 12, ..
        }) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    match ensure_topics(&kafka, &[spec(3)], t).await {
        Err(TopicError::MorePartitions {
            have: 6, want: 3, ..
        }) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
}
