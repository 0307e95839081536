//! Shared fixtures of the speed-layer tests: their own topics, group and Elasticsearch alias
//! per test; the real `pulse-speed` and `pulse-notifier` binaries as child processes (so a
//! test can SIGKILL them); and a ground truth computed here, independently of the engine.

#![allow(dead_code)]

pub mod identities;

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;

use chrono::{DateTime, TimeZone, Utc};
use pulse_core::Event;
use pulse_speed::store::{EsArgs, ProfileStore};
use rust_decimal::Decimal;
use serde_json::Value;

#[allow(unused_imports)] // each test file uses its own subset
pub use pulse_tests::data::{generate, produce, produce_raw, produce_to_partition};
#[allow(unused_imports)] // each test file uses its own subset
pub use pulse_tests::process::{
    counter, free_port, log_file, poll_until, terminate, terminate_in_time, wait_exit, wait_until,
};
#[allow(unused_imports)] // each test file uses its own subset
pub use pulse_tests::set_topic_config;
#[allow(unused_imports)] // each test file uses its own subset
pub use pulse_tests::{brokers, create_topic, es_url, read_topic, unique, PATIENCE};

/// A rule that fires on every cart.
pub const CART_RULE: &str = r#"
[[rule]]
id = "any-cart"
partner = "*"
event = "add_to_cart"
template = "cart_reminder"
"#;

/// One test's topics, consumer group and profile alias.
pub struct Fixture {
    pub topic: String,
    /// Partitions of `topic`.
    pub partitions: i32,
    pub dlq: String,
    pub triggers: String,
    pub triggers_dlq: String,
    pub group: String,
    pub alias: String,
    pub store: ProfileStore,
    /// This fixture's own erasures topic (created by the first erasure a test records).
    pub erasures: String,
}

impl Fixture {
    pub async fn new(name: &str, partitions: i32) -> Self {
        let topic = create_topic(&format!("sp-{name}"), partitions).await;
        let dlq = create_topic(&format!("sp-{name}-dlq"), 2).await;
        let triggers = create_topic(&format!("sp-{name}-trg"), 4).await;
        let triggers_dlq = create_topic(&format!("sp-{name}-trgdlq"), 1).await;
        let alias = unique(&format!("prof-{name}")).to_lowercase();
        let store = ProfileStore::new(&self::es_args(&alias)).expect("store");
        store
            .setup(1, 0)
            .await
            .expect("es setup (is the stack up?)");
        Self {
            erasures: format!("{topic}.erasures"),
            topic,
            partitions,
            dlq,
            triggers,
            triggers_dlq,
            group: unique("speed"),
            alias,
            store,
        }
    }

    /// This fixture's `--state-dir` (the poison-record journal).
    pub fn state_dir(&self) -> String {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/test-state")
            .join(&self.alias)
            .display()
            .to_string()
    }

    pub fn es(&self) -> EsArgs {
        es_args(&self.alias)
    }

    /// `pulse-speed run` on this fixture, with extra flags.
    pub fn spawn_speed(&self, extra: &[&str]) -> Child {
        self.spawn_speed_env(extra, &[])
    }

    /// `pulse-speed run` with extra flags and environment variables.
    pub fn spawn_speed_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pulse-speed"));
        cmd.arg("run")
            .args(["--kafka-brokers", &brokers()])
            .args([
                "--events-topic",
                &self.topic,
                "--dlq-topic",
                &self.dlq,
                "--triggers-topic",
                &self.triggers,
            ])
            .args(["--state-dir", &self.state_dir()])
            .args(["--erasures-topic", &self.erasures])
            .args(extra)
            .env("RUST_LOG", "info,librdkafka=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file(&format!("speed-{}", self.alias)));
        if !extra.contains(&"--es-url") {
            cmd.args(["--es-url", &es_url()]);
        }
        // A test may point a layer elsewhere (another alias or index, another group).
        if !extra.contains(&"--profiles-alias") {
            let index = format!("{}-v1", self.alias);
            cmd.args(["--profiles-alias", &self.alias, "--profiles-index", &index]);
        }
        if !extra.contains(&"--group") {
            cmd.args(["--group", &self.group]);
        }
        if !extra.contains(&"--metrics-listen") {
            cmd.args(["--metrics-listen", "127.0.0.1:0"]);
        }
        cmd.spawn().expect("spawn pulse-speed")
    }

    pub fn spawn_notifier(&self, webhook: &str, extra: &[&str]) -> Child {
        self.spawn_notifier_in(&unique("notifier"), webhook, extra)
    }

    /// `pulse-notifier` in consumer group `group` (a restart keeps its group), with this
    /// fixture's own push-state topic.
    pub fn spawn_notifier_in(&self, group: &str, webhook: &str, extra: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_pulse-notifier"))
            .args(["--kafka-brokers", &brokers()])
            .args([
                "--triggers-topic",
                &self.triggers,
                "--triggers-dlq-topic",
                &self.triggers_dlq,
            ])
            .args(["--state-topic", &format!("{}.state", self.triggers)])
            .args(["--erasures-topic", &self.erasures])
            .args(["--group", group])
            // A test that routes per partner passes its own `--webhooks-file` instead.
            .args(match extra.contains(&"--webhooks-file") {
                true => vec![],
                false => vec!["--webhook-url", webhook],
            })
            .args(match extra.contains(&"--metrics-listen") {
                true => &[][..],
                false => &["--metrics-listen", "127.0.0.1:0"][..],
            })
            .args(extra)
            .env("RUST_LOG", "info,librdkafka=warn")
            .stdout(Stdio::null())
            .stderr(log_file(&format!("notifier-{}", self.alias)))
            .spawn()
            .expect("spawn pulse-notifier")
    }

    /// All profile documents, by id (realtime GETs via a search after refresh).
    pub async fn documents(&self) -> HashMap<String, Value> {
        documents_in(&self.store).await
    }

    /// Waits until the documents hold every event (sum of event_count == n), or PATIENCE.
    pub async fn wait_for_events(&self, n: u64) -> HashMap<String, Value> {
        let deadline = Instant::now() + PATIENCE * 3;
        loop {
            let docs = self.documents().await;
            let total: u64 = docs
                .values()
                .map(|d| d["event_count"].as_u64().unwrap_or(0))
                .sum();
            if total >= n || Instant::now() > deadline {
                return docs;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Every document `store` reads (through its alias or index), by id, after a refresh.
pub async fn documents_in(store: &ProfileStore) -> HashMap<String, Value> {
    store.refresh().await.expect("refresh");
    let body = store
        .search(serde_json::json!({"size": 10000, "query": {"match_all": {}}}))
        .await
        .expect("search");
    body["hits"]["hits"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| (h["_id"].as_str().unwrap().to_string(), h["_source"].clone()))
        .collect()
}

fn es_args(alias: &str) -> EsArgs {
    EsArgs::local(&es_url(), alias, &format!("{alias}-v1"))
}

/// The expected profile of one user, folded here without the engine's code.
#[derive(Debug, Default, Clone)]
pub struct Truth {
    pub event_count: u64,
    pub purchase_count: u64,
    pub total_purchases: Decimal,
    pub last_visit: i64,
    pub first_seen: i64,
    pub country: Option<String>,
    pub session_id: Option<String>,
    pub last_gender: Option<String>,
    pub gender_counts: BTreeMap<String, u64>,
    /// (epoch day, gender) → visits
    pub gender_days: BTreeMap<(i64, String), u64>,
    pub counts: BTreeMap<String, u64>,
}

pub fn ground_truth(events: &[Event]) -> HashMap<String, Truth> {
    let mut out: HashMap<String, Truth> = HashMap::new();
    for e in events {
        let t = out.entry(e.partition_key()).or_insert_with(|| Truth {
            last_visit: i64::MIN,
            first_seen: i64::MAX,
            ..Default::default()
        });
        let ts = e.timestamp.timestamp();
        t.event_count += 1;
        t.last_visit = t.last_visit.max(ts);
        t.first_seen = t.first_seen.min(ts);
        *t.counts.entry(e.event.clone()).or_default() += 1;
        if e.country.is_some() {
            t.country = e.country.clone();
        }
        if e.session_id.is_some() {
            t.session_id = e.session_id.clone();
        }
        if e.event == "purchase" {
            t.purchase_count += 1;
            t.total_purchases += e.cart_amount.unwrap_or_default();
        }
        let page_visit = matches!(
            e.event.as_str(),
            "page_view" | "product_view" | "add_to_cart"
        );
        if let (true, Some(g)) = (page_visit, &e.gender) {
            t.last_gender = Some(g.clone());
            *t.gender_counts.entry(g.clone()).or_default() += 1;
            *t.gender_days
                .entry((ts.div_euclid(86_400), g.clone()))
                .or_default() += 1;
        }
    }
    out
}

fn top(counts: &BTreeMap<String, u64>) -> Option<String> {
    // Highest count; ties to the alphabetically first.
    counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(g, _)| g.clone())
}

impl Truth {
    pub fn top_gender(&self) -> Option<String> {
        top(&self.gender_counts)
    }

    pub fn top_gender_window(&self, now: DateTime<Utc>, days: i64) -> Option<String> {
        let today = now.timestamp().div_euclid(86_400);
        let mut counts = BTreeMap::new();
        for ((day, g), n) in &self.gender_days {
            if *day > today - days && *day <= today {
                *counts.entry(g.clone()).or_default() += n;
            }
        }
        top(&counts)
    }
}

/// Compares every document with the truth; returns the differences (empty when equal).
pub fn diff(docs: &HashMap<String, Value>, truth: &HashMap<String, Truth>) -> Vec<String> {
    let mut problems = Vec::new();
    if docs.len() != truth.len() {
        problems.push(format!(
            "{} documents for {} users",
            docs.len(),
            truth.len()
        ));
    }
    for (id, t) in truth {
        let Some(d) = docs.get(id) else {
            problems.push(format!("{id}: no document"));
            continue;
        };
        let now = Utc
            .timestamp_millis_opt(d["updated_at"].as_i64().unwrap_or(0))
            .unwrap();
        let mut check = |field: &str, got: Value, want: Value| {
            if got != want {
                problems.push(format!("{id}.{field}: got {got}, want {want}"));
            }
        };
        check(
            "event_count",
            d["event_count"].clone(),
            t.event_count.into(),
        );
        check(
            "purchase_count",
            d["purchase_count"].clone(),
            t.purchase_count.into(),
        );
        check(
            "total_purchases",
            d["total_purchases"].clone(),
            Value::String(t.total_purchases.normalize().to_string()),
        );
        check("last_visit", d["last_visit"].clone(), t.last_visit.into());
        check("first_seen", d["first_seen"].clone(), t.first_seen.into());
        check(
            "country",
            d.get("country").cloned().unwrap_or(Value::Null),
            serde_json::json!(t.country),
        );
        check(
            "session_id",
            d.get("session_id").cloned().unwrap_or(Value::Null),
            serde_json::json!(t.session_id),
        );
        check(
            "event_counts",
            d["event_counts"].clone(),
            serde_json::json!(t.counts),
        );
        check(
            "gender_last",
            d["gender_last"].clone(),
            serde_json::json!(t.last_gender),
        );
        check(
            "gender_top",
            d["gender_top"].clone(),
            serde_json::json!(t.top_gender()),
        );
        check(
            "gender_top_7d",
            d["gender_top_7d"].clone(),
            serde_json::json!(t.top_gender_window(now, 7)),
        );
        if problems.len() > 20 {
            break;
        }
    }
    problems
}

// ---------------------------------------------------------------- push webhook

#[derive(Clone, Default)]
pub struct Received {
    /// (idempotency key, body, arrival)
    pub calls: Arc<Mutex<Vec<(String, Value, Instant)>>>,
}

impl Received {
    pub fn keys(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(k, _, _)| k.clone())
            .collect()
    }
}

/// A push webhook on a free port that records every call and answers `status`.
pub async fn webhook(status: StatusCode) -> (String, Received) {
    let received = Received::default();
    let r = received.clone();
    let app = Router::new().route(
        "/push",
        post(move |headers: HeaderMap, body: Bytes| {
            let r = r.clone();
            async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                r.calls.lock().unwrap().push((key, body, Instant::now()));
                status
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/push", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

// ------------------------------------------------------------- recompute commands

/// `pulse-speed recompute <command>` on this fixture's topics, alias and live group.
pub fn recompute(f: &Fixture, command: &str, index: &str, extra: &[&str]) -> Output {
    recompute_command(f, command, index, extra)
        .output()
        .expect("run pulse-speed recompute")
}

pub fn recompute_command(f: &Fixture, command: &str, index: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pulse-speed"));
    cmd.args(["recompute", command, "--index", index])
        .args(["--kafka-brokers", &brokers(), "--es-url", &es_url()])
        .args(["--events-topic", &f.topic, "--dlq-topic", &f.dlq])
        .args(["--triggers-topic", &f.triggers])
        .args(["--erasures-topic", &f.erasures])
        .args(["--profiles-alias", &f.alias, "--group", &f.group])
        .args(["--flush-interval-secs", "0.5"])
        .args(extra)
        .env("RUST_LOG", "info,librdkafka=warn");
    cmd
}

pub fn succeeded(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "recompute failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or(Value::Null)
}

/// Every document of `index`, by id.
pub async fn documents_of(f: &Fixture, index: &str) -> HashMap<String, Value> {
    documents_in(&f.store.on_index(index)).await
}

/// When a document was written (the flush's clock), the one field no fold decides.
pub const WRITE_TIME: &str = "updated_at";

/// The documents that differ between `a` and `b` in any field the events decide, with the
/// first differing field of each.
pub fn differences(a: &HashMap<String, Value>, b: &HashMap<String, Value>) -> Vec<String> {
    let strip = |docs: &HashMap<String, Value>| -> HashMap<String, Value> {
        docs.iter()
            .map(|(id, d)| {
                let mut d = d.clone();
                if let Some(o) = d.as_object_mut() {
                    o.remove(WRITE_TIME);
                }
                (id.clone(), d)
            })
            .collect()
    };
    let (a, b) = (&strip(a), &strip(b));
    let mut out = Vec::new();
    for (id, doc) in a {
        match b.get(id) {
            None => out.push(format!("{id}: missing")),
            Some(other) if other != doc => {
                let fields = doc.as_object().into_iter().flatten();
                let first = fields
                    .filter(|(k, v)| other.get(k.as_str()) != Some(v))
                    .map(|(k, v)| {
                        format!(
                            "{k}: {v} vs {}",
                            other.get(k.as_str()).unwrap_or(&Value::Null)
                        )
                    })
                    .next();
                out.push(format!("{id}: {}", first.unwrap_or_default()));
            }
            Some(_) => {}
        }
    }
    out.extend(
        b.keys()
            .filter(|id| !a.contains_key(*id))
            .map(|id| format!("{id}: extra")),
    );
    out.sort();
    out
}

/// Drops the records of `partition` below `before`, as retention would.
pub async fn expire_records(topic: &str, partition: i32, before: i64) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        pulse_core::kafka::KafkaArgs::with_brokers(brokers())
            .client_config()
            .create()
            .expect("admin client");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(before))
        .unwrap();
    admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .expect("delete records");
}
