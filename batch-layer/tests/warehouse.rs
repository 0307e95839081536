//! Daily BigQuery loads against the BigQuery-API emulator of the local stack (bqemulator), from
//! an archive the real archiver wrote out of real Kafka: a day lands in its partition, loading
//! it again changes nothing, late data is picked up by a re-run, `--since` loads a range, the
//! partition expiration is set, failures are loud, and the BI reports give the same answers on
//! the emulator as on the embedded engine.
//!
//! The emulator reads `gs://bucket/path` from `$PULSE_GCS_ROOT/bucket/path`, so the archive is
//! written there by the local object store and loaded through gs:// URIs.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::Command;

use arrow::record_batch::RecordBatch;
use arrow::util::display::array_value_to_string;
use chrono::NaiveDate;
use common::{report, Fixture};
use pulse_batch::sql;
use pulse_batch::warehouse::{AuthMode, Warehouse, WarehouseArgs};
use pulse_core::Event;
use pulse_tests::data::{generate, produce};
use pulse_tests::unique;
use rust_decimal::Decimal;
use serde_json::Value;

fn api_url() -> String {
    std::env::var("PULSE_BQ_API_URL").unwrap_or_else(|_| "http://localhost:9050/bigquery/v2".into())
}

fn project() -> String {
    std::env::var("PULSE_BQ_PROJECT").unwrap_or_else(|_| "pulse-local".into())
}

fn gcs_root() -> PathBuf {
    std::env::var("PULSE_GCS_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.run/gcs"))
}

/// An archive under the emulator's gs:// root, and a dataset of its own.
struct Setup {
    archive: Fixture,
    source_uri: String,
    dataset: String,
    /// The setup's own erasures topic, which its loads follow.
    erasures: String,
}

impl Setup {
    async fn new(name: &str) -> Self {
        let bucket = unique("pulse-test");
        let dir = gcs_root().join(&bucket).join("archive");
        let archive = Fixture::in_dir(name, 4, dir).await;
        Self {
            erasures: format!("{}.erasures", archive.topic),
            archive,
            source_uri: format!("gs://{bucket}/archive"),
            dataset: format!("t_{}", uuid::Uuid::new_v4().simple()),
        }
    }

    fn args(&self) -> WarehouseArgs {
        WarehouseArgs {
            project: Some(project()),
            dataset: self.dataset.clone(),
            table: "events".into(),
            identities: "identities".into(),
            location: "US".into(),
            api_url: api_url(),
            auth: AuthMode::None,
            key_file: None,
            partition_expiration_days: None,
            job_timeout_secs: 600,
        }
    }

    /// Writes events to the topic and runs the archiver over all of it.
    async fn archive_events(&self, events: &[Event]) {
        produce(&self.archive.topic, events).await;
        self.archive.run_to_end(&["--roll-secs", "0.5"]);
    }

    /// Runs `pulse-batch load …` and returns its JSON reports, or its stderr when it failed.
    fn load(&self, extra: &[&str]) -> Result<Vec<Value>, String> {
        let out = self.load_command(extra).output().expect("run pulse-batch");
        Self::reports(out)
    }

    fn load_command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pulse-batch"));
        cmd.args(["load", "--json", "--archive-url", &self.archive.store.url])
            .args(["--source-uri", &self.source_uri])
            .args(["--bq-api-url", &api_url(), "--bq-project", &project()])
            .args(["--bq-dataset", &self.dataset, "--bq-auth", "none"])
            .args(["--erasures-topic", &self.erasures])
            .args(extra)
            .env("RUST_LOG", "warn");
        cmd
    }

    fn reports(out: std::process::Output) -> Result<Vec<Value>, String> {
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON report line"))
            .collect())
    }

    async fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let wh = Warehouse::connect(&self.args()).await.unwrap();
        rows(&wh.query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")))
    }
}

/// Rows as text, numbers normalised (`12.500000000` and `12.5` are the same amount).
fn rows(batches: &[RecordBatch]) -> Vec<Vec<Option<String>>> {
    let mut out = Vec::new();
    for b in batches {
        for i in 0..b.num_rows() {
            out.push(
                b.columns()
                    .iter()
                    .map(|c| {
                        if c.is_null(i) {
                            return None;
                        }
                        let s = array_value_to_string(c, i).unwrap();
                        Some(match s.parse::<Decimal>() {
                            Ok(d) => d.normalize().to_string(),
                            Err(_) => s,
                        })
                    })
                    .collect(),
            );
        }
    }
    out
}

/// The file names of `warehouse-sql/reports/*.sql`, sorted.
fn report_names() -> Vec<String> {
    let mut reports: Vec<String> = std::fs::read_dir(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../warehouse-sql/reports"),
    )
    .unwrap()
    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
    .filter(|n| n.ends_with(".sql"))
    .collect();
    reports.sort();
    reports
}

/// The table's metadata as the REST API gives it.
async fn table_info(s: &Setup) -> Value {
    let url = format!(
        "{}/projects/{}/datasets/{}/tables/events",
        api_url(),
        project(),
        s.dataset
    );
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

fn day(e: &Event) -> NaiveDate {
    e.timestamp.date_naive()
}

fn days_of(events: &[Event]) -> Vec<NaiveDate> {
    let mut d: Vec<_> = events.iter().map(day).collect();
    d.sort();
    d.dedup();
    d
}

fn count_sql(d: NaiveDate) -> String {
    format!(
        "SELECT COUNT(*), COUNT(DISTINCT message_id), SUM(cart_amount) FROM events \
         WHERE date = DATE '{d}'"
    )
}

/// (rows, distinct ids, exact sum of cart_amount) of the events of day `d`.
fn truth(events: &[Event], d: NaiveDate) -> Vec<Option<String>> {
    let of_day: Vec<&Event> = events.iter().filter(|e| day(e) == d).collect();
    let sum: Decimal = of_day.iter().filter_map(|e| e.cart_amount).sum();
    vec![
        Some(of_day.len().to_string()),
        Some(of_day.len().to_string()),
        Some(sum.normalize().to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_a_day_replaces_its_partition_and_reruns_are_idempotent() {
    let s = Setup::new("bq-load").await;
    let mut events = generate(6_000, 41, 300, 3);
    s.archive_events(&events).await;
    let days = days_of(&events);
    assert_eq!(days.len(), 3, "{days:?}");
    let d = days[1];

    // Day D lands in its partition, and nothing else does.
    let reports = s
        .load(&["--date", &d.to_string(), "--partition-expiration-days", "3"])
        .unwrap();
    assert_eq!(reports.len(), 1);
    let day_rows = events.iter().filter(|e| day(e) == d).count();
    assert_eq!(reports[0]["rows"], day_rows, "{reports:?}");
    assert_eq!(reports[0]["date"], d.to_string());
    assert_eq!(s.query(&count_sql(d)).await, vec![truth(&events, d)]);
    assert_eq!(
        s.query("SELECT COUNT(*) FROM events").await,
        vec![vec![Some(day_rows.to_string())]]
    );

    // The table was created day-partitioned on `date`, expiring partitions after 3 days.
    let table = table_info(&s).await;
    assert_eq!(table["timePartitioning"]["type"], "DAY", "{table}");
    assert_eq!(table["timePartitioning"]["field"], "date");
    assert_eq!(table["timePartitioning"]["expirationMs"], "259200000");

    // Loading the same day again changes nothing; a new expiration is applied to the table.
    s.load(&["--date", &d.to_string(), "--partition-expiration-days", "5"])
        .unwrap();
    assert_eq!(s.query(&count_sql(d)).await, vec![truth(&events, d)]);
    assert_eq!(
        table_info(&s).await["timePartitioning"]["expirationMs"],
        "432000000"
    );

    // Late data for day D arrives and is archived; re-running the load picks it up.
    let late: Vec<Event> = generate(500, 42, 50, 1)
        .into_iter()
        .map(|mut e| {
            e.timestamp = d.and_hms_opt(12, 0, 0).unwrap().and_utc();
            e
        })
        .collect();
    s.archive_events(&late).await;
    assert_eq!(
        s.query(&count_sql(d)).await,
        vec![truth(&events, d)],
        "not loaded yet"
    );
    s.load(&["--date", &d.to_string()]).unwrap();
    events.extend(late);
    assert_eq!(s.query(&count_sql(d)).await, vec![truth(&events, d)]);

    // Every event of the day, by id, with its content: spot-check the columns BI uses.
    let got: HashSet<Vec<Option<String>>> = s
        .query(&format!(
            "SELECT message_id, event, partner_id, user_id, session_id, country, \
             COALESCE(ARRAY_LENGTH(category), 0), CAST(cart_amount AS STRING) FROM events \
             WHERE date = DATE '{d}'"
        ))
        .await
        .into_iter()
        .map(|mut r| {
            // The emulator prints NUMERIC with its scale; compare amounts as decimals.
            r[7] = r[7]
                .take()
                .map(|a| a.parse::<Decimal>().unwrap().normalize().to_string());
            r
        })
        .collect();
    let want: HashSet<Vec<Option<String>>> = events
        .iter()
        .filter(|e| day(e) == d)
        .map(|e| {
            vec![
                Some(e.message_id.clone()),
                Some(e.event.clone()),
                Some(e.partner_id.clone()),
                e.user_id.clone(),
                e.session_id.clone(),
                e.country.clone(),
                Some(e.category.len().to_string()),
                e.cart_amount.map(|a| a.normalize().to_string()),
            ]
        })
        .collect();
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);

    // --since 3 loads the three days up to today.
    let reports = s.load(&["--since", "3"]).unwrap();
    assert_eq!(reports.len(), 3);
    for d in &days {
        assert_eq!(
            s.query(&count_sql(*d)).await,
            vec![truth(&events, *d)],
            "{d}"
        );
    }
    assert_eq!(
        s.query("SELECT COUNT(*) FROM events").await,
        vec![vec![Some(events.len().to_string())]]
    );
}

/// A person erased (the suppression recorded) before `pulse-admin users erase` got to the
/// archive: the load leaves their rows out, and nobody else's, not even the same user id at
/// another partner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_leaves_out_erased_people_whose_files_are_not_rewritten_yet() {
    let s = Setup::new("bq-erased").await;
    let events = generate(3_000, 44, 100, 2);
    s.archive_events(&events).await;
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for e in events.iter().filter(|e| e.partner_id == "shop-a") {
        *count.entry(e.person_id()).or_default() += 1;
    }
    let (person, _) = count
        .iter()
        .max_by_key(|(_, n)| **n)
        .expect("shop-a events");
    let person = person.to_string();
    let erasure = pulse_core::erasure::Erasure {
        partner_id: "shop-a".into(),
        id: person.clone(),
        kind: pulse_core::erasure::IdKind::User,
        request_id: "req-1".into(),
        requested_at: chrono::Utc::now(),
    };
    let kafka = pulse_core::kafka::KafkaArgs {
        brokers: pulse_tests::brokers(),
        options: vec![],
    };
    pulse_service::erasures::record(&kafka, &s.erasures, &[erasure])
        .await
        .expect("record the erasure");

    let reports = s.load(&["--since", "2"]).unwrap();
    let left_out: u64 = reports.iter().map(|r| r["erased"].as_u64().unwrap()).sum();
    assert_eq!(left_out as usize, count[person.as_str()], "{reports:?}");
    let kept: Vec<Event> = events
        .iter()
        .filter(|e| !(e.partner_id == "shop-a" && e.person_id() == person))
        .cloned()
        .collect();
    assert!(kept.len() < events.len());
    for d in days_of(&events) {
        assert_eq!(s.query(&count_sql(d)).await, vec![truth(&kept, d)], "{d}");
    }
    let of = |partner: &str| {
        format!(
            "SELECT COUNT(*) FROM events WHERE partner_id = '{partner}' \
             AND COALESCE(user_id, anonymous_id) = '{person}'"
        )
    };
    assert_eq!(s.query(&of("shop-a")).await, vec![vec![Some("0".into())]]);
    let namesake = events
        .iter()
        .filter(|e| e.partner_id == "shop-b" && e.person_id() == person)
        .count();
    assert_eq!(
        s.query(&of("shop-b")).await,
        vec![vec![Some(namesake.to_string())]],
        "the same id at another partner is another person"
    );
}

/// Two loads of one day at once, each in several staging jobs (as a day of 100 partitions is
/// loaded: more than 10,000 files): each has a staging table of its own, so neither truncates
/// or drops the other's rows, and the partition ends as the whole day, each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_loads_of_one_day_at_once_each_load_the_whole_day() {
    let s = Setup::new("bq-concurrent").await;
    let events = generate(3_000, 44, 200, 1);
    // Several units per partition: a file each, so the day is many files.
    produce(&s.archive.topic, &events[..1_500]).await;
    s.archive.run_to_end(&["--roll-secs", "0.5"]);
    produce(&s.archive.topic, &events[1_500..]).await;
    s.archive.run_to_end(&["--roll-secs", "0.5"]);
    let d = days_of(&events)[0];
    let files = pulse_batch::layout::committed_files(s.archive.store().as_ref(), Some(d))
        .await
        .unwrap()
        .len();
    assert!(files >= 8, "a day of {files} files");
    let args = ["--date", &d.to_string(), "--max-files-per-job", "1"];
    // One load alone, to know how long one takes here: the second load of each round starts
    // part-way through the first (started together, the two run in step and hide what one
    // cuts of the other's staging rows).
    let alone = std::time::Instant::now();
    s.load(&args).unwrap();
    let took = alone.elapsed();
    let spawn = || {
        s.load_command(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    for round in 0..3u32 {
        let a = spawn();
        tokio::time::sleep(took * (round + 1) / 4).await;
        let b = spawn();
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        for out in [a, b] {
            let reports = Setup::reports(out).unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(reports[0]["files"], files);
            assert!(
                reports[0]["jobs"].as_array().unwrap().len() > files,
                "a job per file"
            );
        }
        assert_eq!(
            s.query(&count_sql(d)).await,
            vec![truth(&events, d)],
            "round {round}"
        );
    }
    // Both staging tables dropped.
    assert_eq!(table_names(&s).await, ["events", "identities"]);
}

/// The tables of the setup's dataset, sorted.
async fn table_names(s: &Setup) -> Vec<String> {
    let url = format!(
        "{}/projects/{}/datasets/{}/tables",
        api_url(),
        project(),
        s.dataset
    );
    let tables: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    let mut names: Vec<String> = tables["tables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["tableReference"]["tableId"].as_str())
        .map(str::to_string)
        .collect();
    names.sort_unstable();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_loads_say_why_and_change_nothing() {
    let s = Setup::new("bq-fail").await;
    let events = generate(1_000, 43, 50, 1);
    s.archive_events(&events).await;
    let d = days_of(&events)[0];
    s.load(&["--date", &d.to_string()]).unwrap();

    // A corrupt file committed for the day: the load fails with BigQuery's message, non-zero
    // exit, and the partition keeps what it had.
    let bad = s.archive.dir.join(format!(
        "events/dt={d}/part-099-00000000000000000000-00000000000000000000.parquet"
    ));
    std::fs::write(&bad, b"not parquet").unwrap();
    let marker = s.archive.dir.join("_progress/partition=099");
    std::fs::create_dir_all(&marker).unwrap();
    std::fs::write(marker.join("00000000000000000000"), b"").unwrap();
    let err = s.load(&["--date", &d.to_string()]).unwrap_err();
    assert!(
        err.contains("BigQuery job") && err.contains("failed"),
        "{err}"
    );
    assert!(err.contains("part-099"), "names the file: {err}");
    assert_eq!(s.query(&count_sql(d)).await, vec![truth(&events, d)]);
    assert_eq!(
        table_names(&s).await,
        ["events", "identities"],
        "no staging table left behind"
    );

    // An archive BigQuery cannot read (not on Cloud Storage) is refused before any job.
    let out = Command::new(env!("CARGO_BIN_EXE_pulse-batch"))
        .args(["load", "--date", &d.to_string(), "--archive-url", "/tmp/x"])
        .args(["--bq-project", &project(), "--bq-api-url", &api_url()])
        .env_remove("PULSE_BQ_SOURCE_URI")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--source-uri gs://"), "{err}");

    // A day with no archived files loads nothing and leaves the partition alone.
    let empty = s.load(&["--date", "2001-01-01"]).unwrap();
    assert_eq!(empty[0]["files"], 0);
    assert_eq!(empty[0]["rows"], 0);
}

/// Reports whose SQL the emulator cannot run yet. Each is asserted to fail there, so the day
/// it starts working this list must shrink.
const NOT_ON_EMULATOR: &[&str] = &[];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bi_reports_agree_on_bigquery_and_on_the_embedded_engine() {
    let s = Setup::new("bq-reports").await;
    let events = generate(5_000, 44, 200, 9);
    // Devices merged into people (written today): the people-counting reports join them.
    let (merges, person_of) = pulse_tests::data::merges_for(&events);
    produce(&s.archive.topic, &events).await;
    pulse_tests::data::produce_identities(&s.archive.topic, &merges).await;
    s.archive.run_to_end(&["--roll-secs", "0.5"]);
    let days = days_of(&events);
    let loads = s.load(&["--since", &days.len().to_string()]).unwrap();
    let today = chrono::Utc::now().date_naive().to_string();
    let loaded: Vec<(&str, u64)> = loads
        .iter()
        .map(|r| {
            (
                r["date"].as_str().unwrap(),
                r["identities"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        loaded.contains(&(today.as_str(), person_of.len() as u64 + 2)),
        "each merged device once, and the unlinked one's merge and unlink, today: {loaded:?}"
    );
    let wh = Warehouse::connect(&s.args()).await.unwrap();
    let identities =
        "SELECT partner_id, anonymous_id, user_id, date, kafka_partition, kafka_offset \
                      FROM identities ORDER BY partner_id, anonymous_id, kind";
    let embedded = sql::query(s.archive.store(), identities).await.unwrap();
    let on_bq = wh.query(identities).await.unwrap();
    assert_eq!(rows(&embedded), rows(&on_bq), "identities on both engines");
    assert_eq!(rows(&on_bq).len(), person_of.len() + 2);
    let params: BTreeMap<String, String> = [
        ("start".to_string(), days[1].to_string()),
        ("end".to_string(), days[days.len() - 2].to_string()),
    ]
    .into();
    let reports = report_names();
    assert!(reports.len() >= 6, "{reports:?}");
    for name in &reports {
        let text = sql::substitute(&report(name), &params).unwrap();
        let embedded = sql::query(s.archive.store(), &text)
            .await
            .unwrap_or_else(|e| panic!("{name} on DataFusion: {e}"));
        let on_bq = wh.query(&text).await;
        if NOT_ON_EMULATOR.contains(&name.as_str()) {
            assert!(
                on_bq.is_err(),
                "{name} now runs on the emulator: compare it"
            );
            continue;
        }
        let on_bq = on_bq.unwrap_or_else(|e| panic!("{name} on the emulator: {e}"));
        let (mut a, mut b) = (rows(&embedded), rows(&on_bq));
        assert!(!a.is_empty(), "{name}: no rows to compare");
        // Reports order by their keys; rows equal in those keys may come in any order.
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_report_is_unchanged_when_all_events_are_sent_twice() {
    let once = Setup::new("bq-once").await;
    let twice = Setup::new("bq-twice").await;
    let events = generate(3_000, 45, 150, 4);
    // Every client retried every event: same message ids, written to Kafka after the
    // original. Half of the retries carry a receive time 5 s later, the other half one 5 s
    // earlier (an ingest replica whose clock is behind): the copy kept is the first received,
    // not the first written.
    let retries: Vec<Event> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut r = e.clone();
            let shift = if i % 2 == 0 { 5 } else { -5 };
            r.received_at += chrono::Duration::seconds(shift);
            r
        })
        .collect();
    let earlier_retries = events.len() / 2;
    once.archive_events(&events).await;
    produce(&twice.archive.topic, &events).await;
    twice.archive_events(&retries).await;
    let days = days_of(&events);
    let since = days.len().to_string();
    once.load(&["--since", &since]).unwrap();
    let loads = twice.load(&["--since", &since]).unwrap();

    // The archive stays the raw log; what readers see has each event once.
    let raw = sql::query(twice.archive.store(), "SELECT COUNT(*) FROM events_raw")
        .await
        .unwrap();
    assert_eq!(rows(&raw), vec![vec![Some((2 * events.len()).to_string())]]);
    let duplicates: u64 = loads
        .iter()
        .map(|r| r["duplicates"].as_u64().unwrap())
        .sum();
    let loaded: u64 = loads.iter().map(|r| r["rows"].as_u64().unwrap()).sum();
    assert_eq!(duplicates, events.len() as u64, "{loads:?}");
    assert_eq!(loaded, events.len() as u64, "{loads:?}");
    for d in &days {
        assert_eq!(
            twice.query(&count_sql(*d)).await,
            vec![truth(&events, *d)],
            "{d}"
        );
        let embedded = sql::query(twice.archive.store(), &count_sql(*d))
            .await
            .unwrap();
        assert_eq!(
            rows(&embedded),
            vec![truth(&events, *d)],
            "{d} on DataFusion"
        );
    }
    // The first received copy is the one kept: generated events share one receive time T,
    // their retries have T + 5 s or T - 5 s; kept are T for the first half and T - 5 s (the
    // retry, written later) for the other, never T + 5 s.
    let first = "SELECT COUNT(DISTINCT received_at), \
                 COUNT(CASE WHEN received_at = (SELECT MIN(received_at) FROM events) THEN 1 END) \
                 FROM events";
    let want = vec![vec![Some("2".into()), Some(earlier_retries.to_string())]];
    assert_eq!(twice.query(first).await, want, "BigQuery");
    let embedded = sql::query(twice.archive.store(), first).await.unwrap();
    assert_eq!(rows(&embedded), want, "DataFusion");

    let wh_once = Warehouse::connect(&once.args()).await.unwrap();
    let wh_twice = Warehouse::connect(&twice.args()).await.unwrap();
    let params: BTreeMap<String, String> = [
        ("start".to_string(), days[0].to_string()),
        ("end".to_string(), days[days.len() - 1].to_string()),
    ]
    .into();
    let reports = report_names();
    for name in &reports {
        let text = sql::substitute(&report(name), &params).unwrap();
        let sorted = |mut r: Vec<Vec<Option<String>>>| {
            r.sort();
            r
        };
        let a = sorted(rows(
            &sql::query(once.archive.store(), &text).await.unwrap(),
        ));
        let b = sorted(rows(
            &sql::query(twice.archive.store(), &text).await.unwrap(),
        ));
        assert!(!a.is_empty(), "{name}: no rows");
        assert_eq!(
            a, b,
            "{name} on DataFusion changed when every event was sent twice"
        );
        let a = sorted(rows(&wh_once.query(&text).await.unwrap()));
        let b = sorted(rows(&wh_twice.query(&text).await.unwrap()));
        assert_eq!(
            a, b,
            "{name} on BigQuery changed when every event was sent twice"
        );
    }
}

/// A table an older release created, before the archive's rows carried their Kafka
/// positions: the loader adds the columns it lacks, and the day loads with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_from_an_older_release_gets_the_new_columns_and_loads() {
    let s = Setup::new("bq-evolve").await;
    let events = generate(1_000, 47, 50, 1);
    s.archive_events(&events).await;
    let d = days_of(&events)[0];
    let older: Vec<String> = pulse_core::schema::event_schema()
        .fields()
        .iter()
        .filter(|f| f.name() != "kafka_partition" && f.name() != "kafka_offset")
        .map(|f| {
            let ty = pulse_batch::warehouse::schema::ddl_type(f.data_type()).unwrap();
            let required = !f.is_nullable() && !ty.starts_with("ARRAY");
            format!(
                "`{}` {ty}{}",
                f.name(),
                if required { " NOT NULL" } else { "" }
            )
        })
        .collect();
    let wh = Warehouse::connect(&s.args()).await.unwrap();
    let table = format!("`{}.{}.events`", project(), s.dataset);
    wh.query(&format!("CREATE SCHEMA `{}.{}`", project(), s.dataset))
        .await
        .unwrap();
    wh.query(&format!(
        "CREATE TABLE {table} ({}) PARTITION BY date",
        older.join(", ")
    ))
    .await
    .unwrap();

    let reports = s.load(&["--date", &d.to_string()]).unwrap();
    assert_eq!(reports[0]["rows"], events.len(), "{reports:?}");
    assert_eq!(
        s.query(&format!(
            "SELECT COUNT(kafka_partition), COUNT(kafka_offset) FROM events \
             WHERE date = DATE '{d}'"
        ))
        .await,
        vec![vec![
            Some(events.len().to_string()),
            Some(events.len().to_string())
        ]],
        "every row loaded with its position"
    );
    // Loading again finds nothing to add (or, on the emulator whose catalog does not see the
    // DDL, adds nothing twice) and replaces the day as before.
    let again = s.load(&["--date", &d.to_string()]).unwrap();
    assert_eq!(again[0]["rows"], events.len(), "{again:?}");
}
