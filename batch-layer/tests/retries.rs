//! A client retry counts once, end to end: partners post batches to the real ingest service,
//! the network between ingest and the broker is cut while a batch is written, the clients
//! retry their whole batches with the same ids, and then every event is found exactly once in
//! the profile sums (speed layer → Elasticsearch), the pushes (triggers → notifier → webhook)
//! and the warehouse (archiver → Parquet → load into the BigQuery emulator). A duplicate in
//! Kafka is allowed; a double count anywhere is not.
//!
//! The broker is reached through the stack's `CUTTABLE` listener, which advertises a port this
//! test serves with a proxy it can cut (see `deploy/local/stack`), so no other test notices.
//! The speed layer and the notifier run in this process, from their libraries.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use clap::Parser;
use common::Fixture;
use pulse_core::{parse_event, Event, ParseContext};
use pulse_speed::config::SpeedConfig;
use pulse_speed::notifier::{Notifier, NotifierConfig};
use pulse_speed::store::{EsArgs, ProfileStore};
use pulse_speed::triggers::RuleSet;
use pulse_tests::process::env_or;
use pulse_tests::proxy::CutProxy;
use pulse_tests::{create_topic, ingest_config, read_topic, unique, RunningIngest, PATIENCE};
use rust_decimal::Decimal;
use serde_json::{json, Value};

#[derive(Parser)]
struct SpeedCli {
    #[command(flatten)]
    config: SpeedConfig,
}

#[derive(Parser)]
struct NotifierCli {
    #[command(flatten)]
    config: NotifierConfig,
}

const RULES: &str = r#"
[[rule]]
id = "cart"
partner = "*"
event = "add_to_cart"
template = "cart_reminder"
"#;

/// One partner's batch, as an SDK sends it: explicit message ids and timestamps.
fn batch(partner: &str, n: usize) -> Vec<Value> {
    let now = chrono::Utc::now().timestamp_millis();
    (0..n)
        .map(|i| {
            let user = format!("u{}", i % 40);
            let ts = now - 60_000 + i as i64;
            match i % 4 {
                0 => json!({"event": "purchase", "partner_id": partner, "user_id": user,
                    "message_id": format!("order-{i}"), "timestamp": ts,
                    "cart_amount": format!("{}.{:02}", 10 + i % 90, i % 100)}),
                1 => json!({"event": "add_to_cart", "partner_id": partner, "user_id": user,
                    "message_id": format!("cart-{i}"), "timestamp": ts, "cart_amount": "5.5"}),
                _ => json!({"event": "page_view", "partner_id": partner, "user_id": user,
                    "message_id": format!("view-{i}"), "timestamp": ts}),
            }
        })
        .collect()
}

async fn post_batch(url: &str, key: &str, events: &[Value]) -> (StatusCode, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/events"))
        .basic_auth(key, Some(""))
        .json(&events)
        .send()
        .await
        .expect("ingest answers");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Posts until ingest answers 200 (it answers 503 while the broker is unreachable).
async fn post_until_accepted(url: &str, key: &str, events: &[Value]) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = post_batch(url, key, events).await;
        if status == StatusCode::OK {
            assert_eq!(body["accepted"], json!(events.len()));
            return;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(Instant::now() < deadline, "never accepted: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_retried_after_a_broker_cut_counts_once_in_profiles_pushes_and_the_warehouse() {
    // The archive lives under the BigQuery emulator's gs:// root.
    let bucket = unique("pulse-test");
    let gcs_root = std::env::var("PULSE_GCS_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.run/gcs"));
    let archive = Fixture::in_dir("retry", 4, gcs_root.join(&bucket).join("archive")).await;
    let triggers = create_topic("ar-retry-trg", 2).await;

    // Ingest talks to the broker through a proxy the test can cut.
    let (proxy, advertised) = CutProxy::for_cuttable_broker().await;
    let mut config = ingest_config(&archive.topic);
    config.kafka = pulse_core::kafka::KafkaArgs {
        brokers: advertised.clone(),
        options: vec![("message.timeout.ms".into(), "4000".into())],
    };
    let ingest = RunningIngest::start(config).await;

    // Both partners use the same message ids: different events, each counted once.
    let a = batch("partner-a", 400);
    let b = batch("partner-b", 2_000);
    // Partner A's batch is written, but its client never sees the answer (and retries).
    let (status, _) = post_batch(&ingest.url, "key-a", &a).await;
    assert_eq!(status, StatusCode::OK);
    // Partner B's batch: the network to the broker is cut while it is being written.
    let url = ingest.url.clone();
    let b2 = b.clone();
    let in_flight = tokio::spawn(async move { post_batch(&url, "key-b", &b2).await });
    tokio::time::sleep(Duration::from_millis(3)).await;
    proxy.cut();
    let (status, body) = in_flight.await.unwrap();
    let unacknowledged = body["errors"].as_array().map_or(0, Vec::len);
    eprintln!(
        "batch B during the cut: {status}, {unacknowledged} of {} unacknowledged",
        b.len()
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // The 503 names every unacknowledged event by its id.
        let ids: Vec<&str> = body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["message_id"].as_str().unwrap())
            .collect();
        assert!(!ids.is_empty());
        assert!(ids
            .iter()
            .all(|id| b.iter().any(|e| e["message_id"] == *id)));
    } else {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // While cut, a retry is refused with 503, never a silent 2xx.
    let (status, _) = post_batch(&ingest.url, "key-b", &b[..10]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    proxy.restore();
    // Both clients retry their whole batches, same ids.
    post_until_accepted(&ingest.url, "key-b", &b).await;
    post_until_accepted(&ingest.url, "key-a", &a).await;
    ingest.stop().await.unwrap();

    // Ground truth: each event once.
    let ctx = ParseContext::now();
    let unique_events: Vec<Event> = a
        .iter()
        .chain(&b)
        .map(|v| parse_event(&v.to_string(), &ctx).unwrap())
        .collect();
    let mut totals: HashMap<String, (Decimal, u64, u64)> = HashMap::new();
    for e in &unique_events {
        let t = totals.entry(e.partition_key()).or_default();
        t.2 += 1;
        if e.event == "purchase" {
            t.0 += e.cart_amount.unwrap_or_default();
            t.1 += 1;
        }
    }

    // Speed layer and notifier, in this process.
    let alias = unique("prof-e2e").to_lowercase();
    let es_url = pulse_tests::es_url();
    let store = ProfileStore::new(&EsArgs::local(&es_url, &alias, &format!("{alias}-v1"))).unwrap();
    store.setup(1, 0).await.unwrap();
    let rules_path = std::env::temp_dir().join(format!("{alias}.toml"));
    std::fs::write(&rules_path, RULES).unwrap();
    let speed_config = SpeedCli::parse_from([
        "speed",
        "--kafka-brokers",
        &pulse_tests::brokers(),
        "--events-topic",
        &archive.topic,
        "--dlq-topic",
        &archive.dlq,
        "--triggers-topic",
        &triggers,
        "--es-url",
        &es_url,
        "--profiles-alias",
        &alias,
        "--profiles-index",
        &format!("{alias}-v1"),
        "--group",
        &unique("speed"),
        "--rules-file",
        rules_path.to_str().unwrap(),
        "--flush-interval-secs",
        "0.5",
        "--state-dir",
        std::env::temp_dir().join(&alias).to_str().unwrap(),
    ])
    .config;
    let stop = pulse_service::Shutdown::new();
    let speed_stop = stop.clone();
    let speed = std::thread::spawn(move || {
        let ready = pulse_service::Readiness::new("elasticsearch unavailable");
        pulse_speed::engine::run(&speed_config, speed_stop, ready)
    });
    let pushes: Arc<Mutex<Vec<String>>> = Arc::default();
    let recorded = pushes.clone();
    let app = Router::new().route(
        "/push",
        post(move |headers: HeaderMap| {
            let recorded = recorded.clone();
            async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                recorded.lock().unwrap().push(key);
                StatusCode::OK
            }
        }),
    );
    let webhook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let webhook_url = format!("http://{}/push", webhook.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(webhook, app).await });
    let notifier_config = NotifierCli::parse_from([
        "notifier",
        "--kafka-brokers",
        &pulse_tests::brokers(),
        "--triggers-topic",
        &triggers,
        "--state-topic",
        &format!("{triggers}.state"),
        "--group",
        &unique("notifier"),
        "--webhook-url",
        &webhook_url,
        "--rate-limit-secs",
        "0",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .config;
    let notifier_stop = pulse_service::Shutdown::new();
    let notifier_shutdown = notifier_stop.clone();
    let notifier = tokio::spawn(async move {
        Notifier::new(notifier_config)
            .unwrap()
            .run(
                notifier_shutdown,
                &pulse_service::Readiness::new("notifier not ready"),
            )
            .await
    });

    // Profiles: every user's sums as if each event had been sent once.
    let deadline = Instant::now() + PATIENCE * 2;
    let docs = loop {
        store.refresh().await.unwrap();
        let body = store
            .search(json!({"size": 1000, "query": {"match_all": {}}}))
            .await
            .unwrap();
        let docs: HashMap<String, Value> = body["hits"]["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h["_id"].as_str().unwrap().to_string(), h["_source"].clone()))
            .collect();
        let count: u64 = docs
            .values()
            .map(|d| d["event_count"].as_u64().unwrap_or(0))
            .sum();
        if count >= unique_events.len() as u64 || Instant::now() > deadline {
            break docs;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(docs.len(), totals.len());
    for (id, (sum, purchases, count)) in &totals {
        let d = &docs[id];
        assert_eq!(
            d["total_purchases"],
            json!(sum.normalize().to_string()),
            "{id}"
        );
        assert_eq!(d["purchase_count"], json!(purchases), "{id}");
        assert_eq!(d["event_count"], json!(count), "{id}");
    }

    // Pushes: one per distinct add_to_cart, both partners' "cart-1" included.
    let rules = RuleSet::from_toml(RULES).unwrap();
    let mut want: Vec<String> = unique_events
        .iter()
        .filter(|e| e.event == "add_to_cart")
        .map(|e| rules.rules[0].idempotency_key(e))
        .collect();
    want.sort();
    let deadline = Instant::now() + PATIENCE;
    while pushes.lock().unwrap().len() < want.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut got = pushes.lock().unwrap().clone();
    got.sort();
    assert_eq!(got.len(), want.len(), "pushes: each qualifying event once");
    assert_eq!(got, want);
    // The speed layer fired each once too (the retries were recognised before triggers).
    let fired = read_topic(&triggers, want.len(), Duration::from_secs(1));
    assert_eq!(fired.len(), want.len(), "triggers fired");
    stop.stop();
    speed.join().unwrap().unwrap();
    notifier_stop.stop();
    notifier.await.unwrap().unwrap();

    // Warehouse: the archiver writes what Kafka holds (duplicates included), the load keeps
    // each event once.
    archive.run_to_end(&["--roll-secs", "0.5"]);
    let raw_rows = archive
        .rows()
        .await
        .iter()
        .map(|b| b.num_rows())
        .sum::<usize>();
    assert!(
        raw_rows >= 2 * a.len() + b.len(),
        "the archive is the raw log: {raw_rows}"
    );
    let dataset = format!("t_{}", uuid::Uuid::new_v4().simple());
    let api_url = env_or("PULSE_BQ_API_URL", "http://localhost:9050/bigquery/v2");
    let project = env_or("PULSE_BQ_PROJECT", "pulse-local");
    let days: std::collections::BTreeSet<String> = unique_events
        .iter()
        .map(|e| e.timestamp.date_naive().to_string())
        .collect();
    let mut loaded = 0;
    for day in &days {
        let out = Command::new(env!("CARGO_BIN_EXE_pulse-batch"))
            .args([
                "load",
                "--json",
                "--date",
                day,
                "--archive-url",
                &archive.store.url,
            ])
            .args(["--source-uri", &format!("gs://{bucket}/archive")])
            .args(["--bq-api-url", &api_url, "--bq-project", &project])
            .args(["--bq-dataset", &dataset, "--bq-auth", "none"])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        loaded += report["rows"].as_u64().unwrap();
    }
    assert_eq!(
        loaded,
        unique_events.len() as u64,
        "each event once in the warehouse"
    );
    let wh = pulse_batch::warehouse::Warehouse::connect(&pulse_batch::warehouse::WarehouseArgs {
        project: Some(project.clone()),
        dataset: dataset.clone(),
        table: "events".into(),
        identities: "identities".into(),
        location: "US".into(),
        api_url: api_url.clone(),
        auth: pulse_batch::warehouse::AuthMode::None,
        key_file: None,
        partition_expiration_days: None,
        job_timeout_secs: 600,
    })
    .await
    .unwrap();
    let batches = wh
        .query(
            "SELECT partner_id, COUNT(*), COUNT(DISTINCT message_id), SUM(cart_amount) \
             FROM events GROUP BY partner_id ORDER BY partner_id",
        )
        .await
        .unwrap();
    let mut by_partner: BTreeMap<String, (usize, Decimal)> = BTreeMap::new();
    for e in &unique_events {
        let t = by_partner.entry(e.partner_id.clone()).or_default();
        t.0 += 1;
        t.1 += e.cart_amount.unwrap_or_default();
    }
    let mut got = Vec::new();
    for batch in &batches {
        for i in 0..batch.num_rows() {
            let cell =
                |c: usize| arrow::util::display::array_value_to_string(batch.column(c), i).unwrap();
            got.push((
                cell(0),
                cell(1),
                cell(2),
                cell(3).parse::<Decimal>().unwrap().normalize().to_string(),
            ));
        }
    }
    let want: Vec<_> = by_partner
        .iter()
        .map(|(p, (n, sum))| {
            (
                p.clone(),
                n.to_string(),
                n.to_string(),
                sum.normalize().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got, want,
        "warehouse per partner: rows, distinct ids, exact sums"
    );
}
