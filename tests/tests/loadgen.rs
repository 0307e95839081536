//! The load generator through real ingest into real Kafka: every accepted event arrives once.

use std::collections::HashSet;
use std::time::Duration;

use pulse_loadgen::{run, ClickstreamConfig, LoadConfig, Partner};
use pulse_tests::*;

#[tokio::test]
async fn generated_clickstream_arrives_complete() {
    let topic = create_topic("it-loadgen", 100).await;
    let ingest = RunningIngest::start(ingest_config(&topic)).await;
    let report = run(LoadConfig {
        url: ingest.url.clone(),
        stream: ClickstreamConfig {
            partners: vec![
                Partner {
                    id: "partner-a".into(),
                    key: "key-a".into(),
                },
                Partner {
                    id: "partner-b".into(),
                    key: "key-b".into(),
                },
            ],
            users: 500,
            zipf_exponent: 1.1,
            concurrent_sessions: 32,
            seed: 1,
            login_share: 0.0,
        },
        events: Some(3_000),
        duration: None,
        rate: 0.0,
        batch: 100,
        concurrency: 4,
        pregenerate: false,
    })
    .await
    .unwrap();
    assert_eq!(
        report.events_accepted,
        report.events_sent,
        "{}",
        report.summary()
    );
    assert!(report.events_sent >= 3_000);

    let records = read_topic(&topic, report.events_sent as usize, Duration::from_secs(1));
    assert_eq!(records.len() as u64, report.events_sent);
    let ids: HashSet<String> = records
        .iter()
        .map(|r| r.json()["message_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), records.len(), "no duplicates");
    for (key, partitions) in partitions_by_key(&records) {
        assert_eq!(partitions.len(), 1, "{key} on {partitions:?}");
    }
    ingest.stop().await.unwrap();
}
