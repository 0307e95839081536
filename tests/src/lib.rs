//! Helpers for end-to-end tests against the real local stack (`deploy/local/stack up`).
//!
//! Each test uses its own topics (unique names), so tests run in parallel and never see each
//! other's records.

pub mod data;
pub mod process;
pub mod proxy;
pub mod refusing_proxy;
pub mod sdk;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pulse_core::kafka::{ensure_topics, KafkaArgs, TopicSpec};
use pulse_ingest::IngestConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a test waits for something that should happen before calling it a failure. Not a
/// performance bound: on a healthy stack everything arrives within a second or two.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn brokers() -> String {
    process::env_or("PULSE_KAFKA_BROKERS", "localhost:9092")
}

pub fn es_url() -> String {
    process::env_or("PULSE_ES_URL", "http://localhost:9200")
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Creates a fresh topic with `partitions` partitions.
pub async fn create_topic(prefix: &str, partitions: i32) -> String {
    let name = unique(prefix);
    ensure_topics(
        &KafkaArgs::with_brokers(brokers()),
        &[TopicSpec::new(&name, partitions, 1)],
        Duration::from_secs(30),
    )
    .await
    .expect("create test topic (is the stack up? deploy/local/stack up)");
    name
}

/// Sets one config of `topic` (replacing its other non-default configs, which test topics do
/// not have), as an operator would with `kafka-configs.sh --alter`.
pub async fn set_topic_config(topic: &str, key: &str, value: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = KafkaArgs::with_brokers(brokers())
        .client_config()
        .create()
        .expect("admin client");
    let config = AlterConfig::new(ResourceSpecifier::Topic(topic)).set(key, value);
    let results = admin
        .alter_configs(&[config], &AdminOptions::new())
        .await
        .expect("alter configs");
    for result in results {
        result.unwrap_or_else(|e| panic!("setting {key}={value} on {topic}: {e:?}"));
    }
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: String,
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).expect("record payload is JSON")
    }
}

/// Reads every record of `topic` from the beginning until `expected` are in, or PATIENCE ran
/// out (then returns what it has; the test's assertions report the difference). With
/// `settle`, keeps reading that much longer to catch records that should not be there.
pub fn read_topic(topic: &str, expected: usize, settle: Duration) -> Vec<Record> {
    let consumer: BaseConsumer = KafkaArgs::with_brokers(brokers())
        .consumer_config(&unique("test-reader"))
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    let mut settle_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > deadline || settle_until.is_some_and(|s| now > s) {
            break;
        }
        if out.len() >= expected && settle_until.is_none() {
            if settle.is_zero() {
                break;
            }
            settle_until = Some(now + settle);
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            out.push(Record {
                key: m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default(),
                partition: m.partition(),
                offset: m.offset(),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                let value =
                                    h.value.map(String::from_utf8_lossy).unwrap_or_default();
                                (h.key.to_string(), value.into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
    }
    out
}

/// Records grouped by key → the set of partitions each key was seen on.
pub fn partitions_by_key(records: &[Record]) -> HashMap<String, Vec<i32>> {
    let mut map: HashMap<String, Vec<i32>> = HashMap::new();
    for r in records {
        let v = map.entry(r.key.clone()).or_default();
        if !v.contains(&r.partition) {
            v.push(r.partition);
        }
    }
    map
}

/// An ingest service running in this process, on a free port.
pub struct RunningIngest {
    pub url: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), pulse_ingest::IngestError>>>,
}

impl RunningIngest {
    /// Serves `config` and returns once the erasures are read (ingest answers 503 before):
    /// what a load balancer waits for by `/readyz`.
    pub async fn start(config: IngestConfig) -> Self {
        let ingest = Self::start_unready(config).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = reqwest::get(format!("{}/readyz", ingest.url)).await;
            let body = match ready {
                Ok(resp) => resp.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if !body.contains("erasures are not read") && !body.is_empty() {
                return ingest;
            }
            assert!(
                Instant::now() < deadline,
                "ingest did not read its erasures topic within 60 s: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Serves `config` and returns at once, whether or not it can read its erasures.
    pub async fn start_unready(config: IngestConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(pulse_ingest::serve(config, listener, async {
            let _ = rx.await;
        }));
        Self {
            url,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Graceful stop; returns what `serve` returned.
    pub async fn stop(mut self) -> Result<(), pulse_ingest::IngestError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("ingest task panicked"),
            None => Ok(()),
        }
    }
}

/// Ingest config for tests: our brokers, `topic`, and two partners' keys.
pub fn ingest_config(topic: &str) -> IngestConfig {
    let mut c = IngestConfig::for_brokers(&brokers());
    c.topic = topic.to_string();
    c.write_keys = vec!["key-a=partner-a".into(), "key-b=partner-b".into()];
    // Each test's own erasures (none unless it writes some), not the stack's shared topic.
    c.erasures_topic = format!("{topic}.erasures");
    c
}
