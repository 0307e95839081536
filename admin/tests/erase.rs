//! `pulse-admin users erase` against the real stack: a person with events in every store (a
//! live speed layer merging their device, two profiles indices, three days of archive, the
//! warehouse, the notifier's push state) is erased; then nothing of them is found anywhere
//! (a search of every index, a DuckDB scan of every archive file, the warehouse, the push
//! state, a recompute from the archive), everyone else's data is what it was, events sent
//! after the erasure are dropped, another partner's user with the same id is untouched, the
//! audit log says what was done without naming anyone, and a second run changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use chrono::{NaiveDate, Utc};
use clap::Parser;
use object_store::{ObjectStore, ObjectStoreExt};
use pulse_archive::layout;
use pulse_archive::parquet_file::Archived;
use pulse_archive::store::{open_store, StoreArgs};
use pulse_batch::warehouse::{AuthMode, Warehouse, WarehouseArgs};
use pulse_core::kafka::{ensure_topics, KafkaArgs, TopicSpec};
use pulse_core::{parse_event, Event, ParseContext};
use pulse_service::{Readiness, Shutdown};
use pulse_speed::store::{DocWrite, EsArgs, ItemOutcome, ProfileStore};
use pulse_tests::data::{generate, produce};
use pulse_tests::{brokers, create_topic, es_url, unique};
use serde_json::{json, Value};

const PARTNER: &str = "shop-a";
const PERSON: &str = "erase-me";
const DEVICE: &str = "erase-me-phone";

#[derive(Parser)]
struct Speed {
    #[command(flatten)]
    config: pulse_speed::config::SpeedConfig,
}

#[derive(Parser)]
struct Archiver {
    #[command(flatten)]
    config: pulse_batch::archiver::ArchiverConfig,
}

#[derive(Parser)]
struct Recompute {
    #[command(flatten)]
    args: pulse_speed::recompute::RecomputeArgs,
}

fn gcs_root() -> PathBuf {
    std::env::var("PULSE_GCS_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.run/gcs"))
}

/// One test's topics, alias, archive and dataset.
struct World {
    topic: String,
    dlq: String,
    triggers: String,
    erasures: String,
    state: String,
    alias: String,
    group: String,
    archive_dir: PathBuf,
    source_uri: String,
    dataset: String,
}

impl World {
    async fn new() -> Self {
        let topic = create_topic("er-events", 4).await;
        let state = format!("{topic}.state");
        ensure_topics(
            &KafkaArgs::with_brokers(brokers()),
            &[TopicSpec::compacted(&state, 4, 1)],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        let bucket = unique("pulse-erase");
        let archive_dir = gcs_root().join(&bucket).join("archive");
        std::fs::create_dir_all(&archive_dir).unwrap();
        Self {
            dlq: create_topic("er-dlq", 1).await,
            triggers: create_topic("er-triggers", 4).await,
            erasures: format!("{topic}.erasures"),
            state,
            alias: unique("prof-erase").to_lowercase(),
            group: unique("speed"),
            source_uri: format!("gs://{bucket}/archive"),
            dataset: format!("t_{}", uuid::Uuid::new_v4().simple()),
            archive_dir,
            topic,
        }
    }

    fn kafka_flags(&self) -> Vec<String> {
        [
            "--kafka-brokers",
            &brokers(),
            "--events-topic",
            &self.topic,
            "--dlq-topic",
            &self.dlq,
            "--triggers-topic",
            &self.triggers,
            "--erasures-topic",
            &self.erasures,
        ]
        .map(String::from)
        .to_vec()
    }

    fn es_flags(&self) -> Vec<String> {
        let index = format!("{}-v1", self.alias);
        [
            "--es-url",
            &es_url(),
            "--profiles-alias",
            &self.alias,
            "--profiles-index",
            &index,
        ]
        .map(String::from)
        .to_vec()
    }

    fn speed_config(&self, extra: &[&str]) -> pulse_speed::config::SpeedConfig {
        let mut args = vec!["pulse-speed".to_string()];
        args.extend(self.kafka_flags());
        args.extend(self.es_flags());
        args.extend(["--group", &self.group, "--flush-interval-secs", "0.3"].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        Speed::parse_from(args).config
    }

    /// The speed layer, live, until the returned handle is stopped.
    fn start_speed(&self) -> (Shutdown, std::thread::JoinHandle<()>) {
        let config = self.speed_config(&[]);
        let stop = Shutdown::new();
        let handle = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pulse_speed::engine::run(&config, stop, Readiness::new("speed"))
                    .expect("speed layer");
            })
        };
        (stop, handle)
    }

    /// The archiver over everything in the topic, in a group of its own.
    async fn archive(&self) {
        let mut args = vec!["pulse-archiver".to_string()];
        args.extend(self.kafka_flags());
        let dir = self.archive_dir.display().to_string();
        args.extend(
            [
                "--archive-url",
                &dir,
                "--group",
                &unique("archiver"),
                "--roll-secs",
                "0.3",
                "--stop-at-end",
                "--metrics-listen",
                "127.0.0.1:0",
            ]
            .map(String::from),
        );
        let config = Archiver::parse_from(args).config;
        tokio::task::spawn_blocking(move || {
            pulse_batch::archiver::run(&config, Shutdown::new(), Readiness::new("archiver"))
        })
        .await
        .unwrap()
        .expect("archiver");
    }

    fn store(&self) -> std::sync::Arc<dyn ObjectStore> {
        open_store(&StoreArgs::local(&self.archive_dir)).unwrap()
    }

    fn profiles(&self) -> ProfileStore {
        ProfileStore::new(&EsArgs::local(
            &es_url(),
            &self.alias,
            &format!("{}-v1", self.alias),
        ))
        .unwrap()
    }

    fn warehouse_args(&self) -> WarehouseArgs {
        WarehouseArgs {
            project: Some(
                std::env::var("PULSE_BQ_PROJECT").unwrap_or_else(|_| "pulse-local".into()),
            ),
            dataset: self.dataset.clone(),
            table: "events".into(),
            identities: "identities".into(),
            location: "US".into(),
            api_url: std::env::var("PULSE_BQ_API_URL")
                .unwrap_or_else(|_| "http://localhost:9050/bigquery/v2".into()),
            auth: AuthMode::None,
            key_file: None,
            partition_expiration_days: None,
            job_timeout_secs: 600,
        }
    }

    /// Loads `days` as `pulse-batch load` does: following this world's erasures.
    async fn load_days(&self, days: &BTreeSet<NaiveDate>) {
        let wh = Warehouse::connect(&self.warehouse_args()).await.unwrap();
        wh.ensure_table().await.unwrap();
        let store = self.store();
        let kafka = KafkaArgs {
            brokers: brokers(),
            options: vec![],
        };
        let feed = pulse_service::erasures::ErasureFeed::follow(
            kafka.consumer_config("erase-test"),
            &self.erasures,
        );
        feed.loaded(Duration::from_secs(60)).await.unwrap();
        let erased = feed.read().clone();
        for day in days {
            pulse_batch::warehouse::load::load_day(
                &wh,
                store.as_ref(),
                &self.source_uri,
                *day,
                10_000,
                &erased,
            )
            .await
            .unwrap();
        }
    }

    /// `pulse-admin users erase` (or `erasures`) with this world's flags: its output.
    fn admin(&self, command: &str, extra: &[&str]) -> Value {
        let out = self
            .admin_command(command, extra)
            .output()
            .expect("run pulse-admin");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "pulse-admin users {command} failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if command == "erasures" {
            return Value::String(stdout);
        }
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    }

    fn admin_command(&self, command: &str, extra: &[&str]) -> Command {
        let wh = self.warehouse_args();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pulse-admin"));
        cmd.args(["users", command, "--archive-url"])
            .arg(&self.archive_dir)
            .env("RUST_LOG", "warn");
        if command == "erase" {
            cmd.args(self.kafka_flags())
                .args(self.es_flags())
                .args(["--state-topic", &self.state, "--settle-secs", "2"])
                .args(["--bq-project", wh.project.as_deref().unwrap_or_default()])
                .args([
                    "--bq-dataset",
                    &wh.dataset,
                    "--bq-api-url",
                    &wh.api_url,
                    "--bq-auth",
                    "none",
                ])
                .args(["--operator", "dpo@test", "--reference", "TICKET-7"]);
        }
        cmd.args(extra);
        cmd
    }
}

fn event(json: Value) -> Event {
    let e = parse_event(&json.to_string(), &ParseContext::now()).unwrap();
    Event::from_canonical_json(&e.to_canonical_json()).unwrap()
}

/// The person's life over three days: browsing on a phone anonymously, logging in on it,
/// buying; and another partner's user with the same id.
fn the_person(days: &[i64]) -> Vec<Event> {
    let now = Utc::now().timestamp_millis();
    let mut out = Vec::new();
    for (d, age) in days.iter().enumerate() {
        let at = now - age * 86_400_000;
        out.push(event(
            json!({"event": "product_view", "partner_id": PARTNER, "anonymous_id": DEVICE,
            "message_id": format!("dev-{d}"), "timestamp": at, "category": "Shoes"}),
        ));
        out.push(event(
            json!({"event": "add_to_cart", "partner_id": PARTNER, "user_id": PERSON,
            "anonymous_id": DEVICE, "message_id": format!("login-{d}"), "timestamp": at + 1,
            "cart_amount": "19.90"}),
        ));
        out.push(event(
            json!({"event": "purchase", "partner_id": PARTNER, "user_id": PERSON,
            "message_id": format!("buy-{d}"), "timestamp": at + 2, "cart_amount": "19.90"}),
        ));
        out.push(event(
            json!({"event": "purchase", "partner_id": "shop-b", "user_id": PERSON,
            "message_id": format!("other-{d}"), "timestamp": at + 3, "cart_amount": "5.00"}),
        ));
    }
    out
}

fn erased(partner: &str, user: Option<&str>, anonymous: Option<&str>) -> bool {
    partner == PARTNER && matches!(user.or(anonymous), Some(PERSON) | Some(DEVICE))
}

/// How many archived events are the person's.
fn persons_rows(rows: &BTreeMap<String, Vec<Archived>>) -> usize {
    rows.values()
        .flatten()
        .filter(|r| {
            erased(
                &r.event.partner_id,
                r.event.user_id.as_deref(),
                r.event.anonymous_id.as_deref(),
            )
        })
        .count()
}

/// A warehouse row (partner, user or "", anonymous or "", message id) of the person's.
fn erased_row((p, u, a, _): &(String, String, String, String)) -> bool {
    fn some(t: &str) -> Option<&str> {
        Some(t).filter(|t| !t.is_empty())
    }
    erased(p, some(u), some(a))
}

/// The days of the committed event files.
async fn archived_days(store: &dyn ObjectStore) -> BTreeSet<NaiveDate> {
    layout::committed_files(store, None)
        .await
        .unwrap()
        .iter()
        .map(|f| f.dt)
        .collect()
}

/// Every row of every committed event file, by file.
async fn archive_rows(store: &dyn ObjectStore) -> BTreeMap<String, Vec<Archived>> {
    let mut out = BTreeMap::new();
    for f in layout::committed_files(store, None).await.unwrap() {
        let bytes: Bytes = store.get(&f.path).await.unwrap().bytes().await.unwrap();
        out.insert(
            f.path.to_string(),
            pulse_archive::reader::read(bytes).unwrap(),
        );
    }
    out
}

/// Every identity row, as (partner, device, person, kind), with its file.
async fn identity_rows(store: &dyn ObjectStore) -> Vec<(String, Option<String>, String, String)> {
    let mut out = Vec::new();
    for f in layout::committed_identity_files(store, None).await.unwrap() {
        let bytes = store.get(&f.path).await.unwrap().bytes().await.unwrap();
        for row in pulse_archive::identity_file::read(bytes).unwrap() {
            let json: Value = serde_json::from_slice(&row.record.to_json()).unwrap();
            out.push((
                json["partner_id"].as_str().unwrap_or_default().to_string(),
                json["anonymous_id"].as_str().map(str::to_string),
                json["user_id"].as_str().unwrap_or_default().to_string(),
                json["kind"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    out
}

/// Every document of every index of the alias, by index and id.
async fn all_documents(profiles: &ProfileStore) -> BTreeMap<String, HashMap<String, Value>> {
    let mut out = BTreeMap::new();
    for index in pulse_speed::erase::profile_indices(profiles).await.unwrap() {
        let docs = documents_in(&profiles.on_index(&index)).await;
        out.insert(index, docs);
    }
    out
}

/// Every document of one index (or alias), by id.
async fn documents_in(store: &ProfileStore) -> HashMap<String, Value> {
    store.refresh().await.unwrap();
    let body = store
        .search(json!({"size": 10000, "query": {"match_all": {}}}))
        .await
        .unwrap();
    body["hits"]["hits"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| (h["_id"].as_str().unwrap().to_string(), h["_source"].clone()))
        .collect()
}

fn is_persons_doc(id: &str) -> bool {
    id == format!("{PARTNER}:{PERSON}") || id == format!("{PARTNER}:{DEVICE}")
}

/// The warehouse's rows as (partner, user, anonymous, message id), sorted.
async fn warehouse_rows(world: &World) -> Vec<(String, String, String, String)> {
    let wh = Warehouse::connect(&world.warehouse_args()).await.unwrap();
    let sql = format!(
        "SELECT partner_id, COALESCE(user_id, ''), COALESCE(anonymous_id, ''), message_id \
         FROM `{}.{}.events` ORDER BY 1, 2, 3, 4",
        wh.project, wh.dataset
    );
    let batches = wh.query(&sql).await.unwrap();
    let mut out = Vec::new();
    for b in batches {
        let col = |i: usize| {
            b.column(i)
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap()
                .clone()
        };
        let (p, u, a, m) = (col(0), col(1), col(2), col(3));
        for i in 0..b.num_rows() {
            out.push((
                p.value(i).to_string(),
                u.value(i).to_string(),
                a.value(i).to_string(),
                m.value(i).to_string(),
            ));
        }
    }
    out.sort();
    out
}

/// DuckDB's count of the person's rows over every archive file (events and identities).
fn duckdb_count(dir: &std::path::Path) -> (u64, u64) {
    let script = format!(
        "import duckdb\n\
         ev = duckdb.sql(\"select count(*) from read_parquet('{d}/events/*/*.parquet') where partner_id = '{PARTNER}' \
           and (user_id in ('{PERSON}', '{DEVICE}') or anonymous_id = '{DEVICE}' and user_id is null)\").fetchone()[0]\n\
         ids = duckdb.sql(\"select count(*) from read_parquet('{d}/identities/*/*.parquet') where partner_id = '{PARTNER}' \
           and (user_id in ('{PERSON}', '{DEVICE}') or anonymous_id in ('{PERSON}', '{DEVICE}'))\").fetchone()[0]\n\
         print(ev, ids)",
        d = dir.display()
    );
    let text = pulse_tests::process::python_output(&script);
    let mut n = text.split_whitespace().map(|t| t.parse::<u64>().unwrap());
    (n.next().unwrap(), n.next().unwrap())
}

/// Writes a push-state record for `user` as the notifier keeps it.
async fn push_state(world: &World, user: &str) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = KafkaArgs::with_brokers(brokers())
        .producer_config()
        .create()
        .unwrap();
    let payload = json!({"last_push_ms": Utc::now().timestamp_millis(), "delivered": [["k1", 1]]})
        .to_string();
    let partition = pulse_core::partitioner::partition_of(user.as_bytes(), 4);
    producer
        .send(
            FutureRecord::to(&world.state)
                .partition(partition)
                .key(user)
                .payload(&payload),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
}

/// The newest state record per user: `None` for a tombstone.
fn push_states(world: &World) -> HashMap<String, Option<Vec<u8>>> {
    let mut out = HashMap::new();
    for p in 0..4 {
        let config = KafkaArgs::with_brokers(brokers()).consumer_config("test-state");
        for (key, payload) in pulse_service::consumer::compacted::read_to_end(
            config,
            &world.state,
            p,
            Duration::from_secs(30),
        )
        .unwrap()
        {
            out.insert(key, payload);
        }
    }
    out
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_person_is_erased_from_every_store_and_nobody_else_loses_anything() {
    let world = World::new().await;
    let profiles = world.profiles();
    profiles.setup(1, 0).await.unwrap();
    let mut events = generate(600, 24, 40, 3);
    events.extend(the_person(&[0, 1, 2]));
    produce(&world.topic, &events).await;

    // The live layer folds it all and merges the phone into the person.
    let (stop, speed) = world.start_speed();
    let person_id = format!("{PARTNER}:{PERSON}");
    wait_for("the phone merged into the person", async || {
        let _ = profiles.refresh().await;
        profiles
            .get(&person_id)
            .await
            .ok()
            .flatten()
            .is_some_and(|d| {
                d["aliases"]
                    .as_array()
                    .is_some_and(|a| a.contains(&json!(DEVICE)))
            })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    world.archive().await;
    // An index kept for rollback: a copy of the live one.
    let rollback = format!("{}-v0", world.alias);
    let live_docs = all_documents(&profiles).await;
    let copies: Vec<DocWrite> = live_docs
        .values()
        .flatten()
        .map(|(id, doc)| DocWrite {
            id: id.clone(),
            version: doc["watermark"]["offset"].as_i64().unwrap_or(1).max(1),
            doc: serde_json::to_vec(doc).unwrap(),
        })
        .collect();
    let written = profiles
        .on_index(&rollback)
        .bulk_write(&copies)
        .await
        .unwrap();
    assert!(
        written.iter().all(|w| *w == ItemOutcome::Written),
        "{written:?}"
    );
    let store = world.store();
    let days = archived_days(store.as_ref()).await;
    assert!(days.len() >= 3, "{days:?}");
    world.load_days(&days).await;
    push_state(&world, &person_id).await;
    push_state(&world, "shop-b:erase-me").await;

    // Before: what the person has, and everyone else's data.
    let docs_before = all_documents(&profiles).await;
    assert_eq!(docs_before.len(), 2, "{:?}", docs_before.keys());
    for docs in docs_before.values() {
        assert!(docs.contains_key(&person_id) && docs.contains_key(&format!("{PARTNER}:{DEVICE}")));
    }
    let rows_before = archive_rows(store.as_ref()).await;
    let persons_before = persons_rows(&rows_before);
    assert_eq!(persons_before, 9, "three days of phone, login and purchase");
    let identities_before = identity_rows(store.as_ref()).await;
    assert!(identities_before
        .iter()
        .any(|(p, a, _, _)| p == PARTNER && a.as_deref() == Some(DEVICE)));
    let warehouse_before = warehouse_rows(&world).await;
    assert_eq!(warehouse_before.iter().filter(|r| erased_row(r)).count(), 9);

    // A dry run says what would go and changes nothing.
    let dry = world.admin(
        "erase",
        &["--partner", PARTNER, "--user", PERSON, "--dry-run"],
    );
    assert_eq!(dry["dry_run"], json!(true));
    assert_eq!(dry["archive"]["rows_removed"].as_u64().unwrap() as usize, persons_before + identities_before.iter().filter(|(p, a, u, _)| p == PARTNER && (u == PERSON || a.as_deref() == Some(DEVICE))).count());
    assert_eq!(dry["archive"]["bytes_written"], json!(0));
    assert_eq!(
        all_documents(&profiles).await,
        docs_before,
        "a dry run deletes nothing"
    );
    assert_eq!(archive_rows(store.as_ref()).await, rows_before);

    // Erased by its phone's anonymous id: the person it was merged into goes, with it.
    let report = world.admin("erase", &["--partner", PARTNER, "--anonymous-id", DEVICE]);
    assert_eq!(
        report["requests"][0]["ids"],
        json!({"alias": 1, "user": 1}),
        "{report}"
    );
    // The rollback index's two documents; the live index's went already, deleted by the
    // live layer itself when it saw the erasure (so they are not counted here).
    assert_eq!(report["documents"][&rollback], json!(2), "{report}");
    assert_eq!(
        report["archive"]["rows_removed"], dry["archive"]["rows_removed"],
        "{report}"
    );
    assert!(
        report["warehouse"]["identities"].as_u64() >= Some(1),
        "the merge: {report}"
    );
    let wh_events: u64 = report["warehouse"]["events"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(wh_events, 9, "{report}");
    assert_eq!(report["push_state_tombstones"], json!(2));

    // After: nothing of the person, anywhere; everyone else's data as it was.
    tokio::time::sleep(Duration::from_secs(2)).await; // a flush of the live layer, had it kept them
    let docs_after = all_documents(&profiles).await;
    for (index, before) in &docs_before {
        let others: HashMap<String, Value> = before
            .iter()
            .filter(|(id, _)| !is_persons_doc(id))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(
            docs_after[index], others,
            "{index}: the person gone, the others untouched"
        );
        assert!(
            others.contains_key("shop-b:erase-me"),
            "another partner's erase-me stays"
        );
    }
    let rows_after = archive_rows(store.as_ref()).await;
    let expected: BTreeMap<String, Vec<Archived>> = rows_before
        .iter()
        .map(|(path, rows)| {
            let kept = rows
                .iter()
                .filter(|r| {
                    !erased(
                        &r.event.partner_id,
                        r.event.user_id.as_deref(),
                        r.event.anonymous_id.as_deref(),
                    )
                })
                .cloned()
                .collect();
            (path.clone(), kept)
        })
        .collect();
    assert_eq!(
        rows_after, expected,
        "every other row as it was, in the same files"
    );
    assert_eq!(
        duckdb_count(&world.archive_dir),
        (0, 0),
        "DuckDB finds none of the person's rows"
    );
    let warehouse_after = warehouse_rows(&world).await;
    let kept: Vec<_> = warehouse_before
        .iter()
        .filter(|r| !erased_row(r))
        .cloned()
        .collect();
    assert_eq!(warehouse_after, kept);
    world.load_days(&days).await;
    assert_eq!(
        warehouse_rows(&world).await,
        kept,
        "the days loaded again: the same rows"
    );
    let states = push_states(&world);
    assert_eq!(
        states.get(&person_id),
        Some(&None),
        "the person's push state is a tombstone"
    );
    assert!(states.get("shop-b:erase-me").is_some_and(Option::is_some));

    // Their records still in Kafka are named, not shown, by an operator's peek.
    let partition = pulse_core::partitioner::partition_of(person_id.as_bytes(), 4);
    let out = Command::new(env!("CARGO_BIN_EXE_pulse-admin"))
        .args(["topics", "peek", &world.topic, "--count", "10000"])
        .args(["--partition", &partition.to_string()])
        .args([
            "--kafka-brokers",
            &brokers(),
            "--erasures-topic",
            &world.erasures,
        ])
        .output()
        .unwrap();
    let peeked = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(peeked.contains("key (erased)"), "{peeked}");
    // The person's own message ids (the same id at shop-b may share the partition).
    assert!(
        !peeked.contains("\"buy-") && !peeked.contains("\"login-"),
        "{peeked}"
    );
    assert!(
        peeked.contains("message_id"),
        "other people's records are shown"
    );

    // Events of the person sent after the erasure reach no store.
    let later = the_person(&[0]);
    produce(&world.topic, &later).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    world.archive().await;
    let rows_later = archive_rows(store.as_ref()).await;
    let persons_later = persons_rows(&rows_later);
    assert_eq!(persons_later, 0, "the archiver dropped them");
    assert!(
        rows_later
            .values()
            .flatten()
            .any(|r| r.event.message_id == "other-0" && r.event.partner_id == "shop-b"),
        "another partner's same id still archived"
    );
    let live = all_documents(&profiles).await;
    assert!(
        live.values()
            .all(|docs| docs.keys().all(|id| !is_persons_doc(id))),
        "the live layer wrote nothing of them"
    );
    stop.stop();
    speed.join().unwrap();

    // A recompute from the archive (and Kafka) brings nobody back.
    let index = format!("{}-v2", world.alias);
    let mut args = vec!["pulse-speed".to_string()];
    args.extend(world.kafka_flags());
    args.extend(world.es_flags());
    args.extend(["--group", &world.group, "--index", &index, "--archive-url"].map(String::from));
    args.push(world.archive_dir.display().to_string());
    let recompute = Recompute::parse_from(args).args;
    let run = tokio::task::spawn_blocking(move || {
        pulse_speed::recompute::run(&recompute, Shutdown::new())
    })
    .await
    .unwrap();
    run.expect("recompute");
    let docs = documents_in(&profiles.on_index(&index)).await;
    assert!(docs.len() > 40, "{} documents", docs.len());
    assert!(
        docs.keys().all(|id| !is_persons_doc(id)),
        "recomputed without them"
    );
    assert!(docs.contains_key("shop-b:erase-me"));

    // The audit log: done, by whom, and no id in it.
    let log = world.admin("erasures", &["--json"]);
    let text = log.as_str().unwrap();
    assert!(
        !text.contains(PERSON) && !text.contains(DEVICE),
        "no personal data: {text}"
    );
    let record: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(record["operator"], json!("dpo@test"));
    assert_eq!(record["reference"], json!("TICKET-7"));
    assert!(record["completed_at"].is_string(), "{record}");
    for step in ["suppressed", "profiles", "notifier", "archive", "warehouse"] {
        assert!(
            record["steps"][step]["done_at"].is_string(),
            "{step}: {record}"
        );
    }

    // Again, by user id: the same request, nothing left to remove.
    let again = world.admin("erase", &["--partner", PARTNER, "--user", PERSON]);
    assert_eq!(
        again["requests"][0]["request_id"],
        report["requests"][0]["request_id"]
    );
    assert_eq!(again["archive"]["rows_removed"], json!(0), "{again}");
    assert!(
        again["documents"]
            .as_object()
            .unwrap()
            .values()
            .all(|n| n == &json!(0)),
        "{again}"
    );
    assert_eq!(archive_rows(store.as_ref()).await, rows_later);
}

/// An erasure killed (no cleanup, as under SIGKILL) half-way through the archive rewrite
/// leaves every file whole (old or new, each readable, every marker as it was), and running
/// the command again finishes it: nothing of the person anywhere, everybody else's rows
/// untouched, the audit record complete after two runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_killed_during_the_archive_rewrite_is_finished_by_a_rerun() {
    let world = World::new().await;
    let mut events = generate(400, 25, 30, 3);
    events.extend(the_person(&[0, 1, 2]));
    produce(&world.topic, &events).await;
    world.archive().await;
    let store = world.store();
    let days = archived_days(store.as_ref()).await;
    world.load_days(&days).await;
    // No profiles index knows the phone: erased by user id, the person's own rows go.
    let persons =
        |r: &Archived| r.event.partner_id == PARTNER && r.event.user_id.as_deref() == Some(PERSON);
    let before = archive_rows(store.as_ref()).await;
    let files_with_person = before
        .values()
        .filter(|rows| rows.iter().any(persons))
        .count();
    assert!(
        files_with_person >= 3,
        "one file a day at least: {files_with_person}"
    );
    // What the markers say: each committed file's name, day and offset range (not its size).
    let committed = async || -> Vec<(String, NaiveDate, layout::FileRange)> {
        layout::committed_files(store.as_ref(), None)
            .await
            .unwrap()
            .into_iter()
            .map(|f| (f.path.to_string(), f.dt, f.range))
            .collect()
    };
    let markers_before = committed().await;

    let out = world
        .admin_command("erase", &["--partner", PARTNER, "--user", PERSON])
        .env("PULSE_FAILPOINT_ERASE_KILL_AFTER_FILES", "1")
        .output()
        .unwrap();
    assert!(!out.status.success(), "killed half-way");

    // Half-way: one file rewritten, the others as they were; every file whole.
    let half = archive_rows(store.as_ref()).await;
    assert_eq!(
        committed().await,
        markers_before,
        "the same committed files, same ranges"
    );
    let still = half
        .values()
        .filter(|rows| rows.iter().any(persons))
        .count();
    assert_eq!(
        still,
        files_with_person - 1,
        "one file done, the rest untouched"
    );
    let others = |rows: &BTreeMap<String, Vec<Archived>>| -> BTreeMap<String, Vec<String>> {
        rows.iter()
            .map(|(f, rows)| {
                let kept = rows
                    .iter()
                    .filter(|r| !persons(r))
                    .map(|r| format!("{r:?}"))
                    .collect();
                (f.clone(), kept)
            })
            .collect()
    };
    assert_eq!(others(&half), others(&before), "nobody else's rows changed");
    let log = world.admin("erasures", &["--json"]);
    let record: Value = serde_json::from_str(log.as_str().unwrap().trim()).unwrap();
    assert!(record["steps"].get("archive").is_none(), "{record}");
    assert!(record["completed_at"].is_null());

    // The rerun finishes it.
    let report = world.admin("erase", &["--partner", PARTNER, "--user", PERSON]);
    assert_eq!(
        report["requests"][0]["request_id"], record["request_id"],
        "the same request"
    );
    assert_eq!(
        report["archive"]["files_rewritten"].as_u64(),
        Some(still as u64)
    );
    let after = archive_rows(store.as_ref()).await;
    assert_eq!(after.values().flatten().filter(|r| persons(r)).count(), 0);
    assert_eq!(
        others(&after),
        others(&before),
        "nobody else's rows changed"
    );
    let in_warehouse = warehouse_rows(&world)
        .await
        .into_iter()
        .filter(|(p, u, _, _)| p == PARTNER && u == PERSON)
        .count();
    assert_eq!(in_warehouse, 0);
    let log = world.admin("erasures", &["--json"]);
    let record: Value = serde_json::from_str(log.as_str().unwrap().trim()).unwrap();
    assert!(record["completed_at"].is_string(), "{record}");
    assert_eq!(record["runs"].as_array().map(Vec::len), Some(2), "{record}");
}
