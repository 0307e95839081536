//! Recompute against the real stack: the same stream folded by the live speed layer, by a
//! recompute from Kafka only and by a recompute from the Parquet archive then Kafka gives the
//! same documents field for field; promotion moves the alias with the live layer handing over
//! exactly; a rollback moves it back.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use object_store::local::LocalFileSystem;
use pulse_archive::layout::{self, FileRange};
use pulse_core::Event;
use serde_json::{json, Value};

/// Archives what the topic holds now with the real `pulse-archiver` (`--stop-at-end`, in a
/// group of its own, small units: several per partition), into `dir`; each partition's
/// archived range so far (from its first file to its last marker). Called again after more
/// records, it goes on where the archive is. Bad records make units of markers only.
async fn archive_topic(f: &Fixture, dir: &std::path::Path) -> BTreeMap<i32, FileRange> {
    std::fs::create_dir_all(dir).unwrap();
    // Built beside this test by `cargo test --workspace` (pulse-batch's own tests need it).
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .map(|debug| debug.join("pulse-archiver"))
        .unwrap();
    assert!(
        bin.exists(),
        "{} missing: cargo build -p pulse-batch --bin pulse-archiver (cargo test --workspace builds it)",
        bin.display()
    );
    let group = unique("recompute-archiver");
    let status = Command::new(&bin)
        .args(["--kafka-brokers", &brokers(), "--events-topic", &f.topic])
        .args(["--dlq-topic", &f.dlq, "--group", &group])
        .args(["--archive-url", &dir.to_string_lossy()])
        .args([
            "--stop-at-end",
            "--roll-bytes",
            "30000",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info,librdkafka=warn")
        .stdout(std::process::Stdio::null())
        .stderr(log_file(&format!("archiver-{group}")))
        .status()
        .unwrap();
    assert!(status.success(), "pulse-archiver exited with {status}");
    let store = LocalFileSystem::new_with_prefix(dir).unwrap();
    let done = layout::progress(&store).await.unwrap();
    let mut ranges: BTreeMap<i32, FileRange> = BTreeMap::new();
    for file in layout::committed_files(&store, None).await.unwrap() {
        let r = file.range;
        let range = ranges.entry(r.partition).or_insert(r);
        range.first = range.first.min(r.first);
    }
    for (p, last) in done {
        ranges
            .entry(p)
            .or_insert(FileRange {
                partition: p,
                first: 0,
                last,
            })
            .last = last;
    }
    ranges
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_kafka_only_and_archive_then_kafka_give_identical_profiles_and_promotion_hands_over_exactly(
) {
    let f = Fixture::new("recompute", 4).await;
    let events = generate(3_000, 77, 120, 10);
    let (first, rest) = events.split_at(2_000);
    let (second, third) = rest.split_at(500);
    let live_args = ["--flush-interval-secs", "0.5"];
    let mut live = f.spawn_speed(&live_args);
    // The archive holds the first part, written by the archiver in three runs: units of
    // events with client retries among them (same message ids: they count once), then units
    // of bad records only (markers, no files), then the rest. The second part arrives while
    // the recomputes run.
    let dir = std::env::temp_dir().join(format!("{}-archive", f.alias));
    let (early, late) = first.split_at(1_000);
    produce(&f.topic, early).await;
    produce(&f.topic, &early[..150]).await;
    archive_topic(&f, &dir).await;
    let bad: Vec<String> = (0..8).map(|i| format!("shop-a:bad-{i}")).collect();
    let garbage: Vec<(Option<&str>, &[u8])> = bad
        .iter()
        .map(|k| (Some(k.as_str()), &b"not an event"[..]))
        .collect();
    produce_raw(&f.topic, &garbage).await;
    let after_bad = archive_topic(&f, &dir).await;
    let store = LocalFileSystem::new_with_prefix(&dir).unwrap();
    let files = layout::committed_files(&store, None).await.unwrap();
    let marker_only = after_bad.iter().filter(|(p, r)| {
        let last_file = files
            .iter()
            .filter(|file| file.range.partition == **p)
            .map(|file| file.range.last)
            .max();
        last_file.is_some_and(|l| l < r.last)
    });
    assert!(
        marker_only.count() > 0,
        "a unit of bad records only: {after_bad:?}"
    );
    produce(&f.topic, late).await;
    let ranges = archive_topic(&f, &dir).await;
    f.wait_for_events(first.len() as u64).await;
    let files = layout::committed_files(&store, None).await.unwrap();
    for p in 0..f.partitions {
        let units: std::collections::BTreeSet<i64> = files
            .iter()
            .filter(|file| file.range.partition == p)
            .map(|file| file.range.first)
            .collect();
        assert!(units.len() >= 3, "partition {p}: {} units", units.len());
    }
    assert!(ranges.len() as i32 == f.partitions, "{ranges:?}");
    let archive = dir.to_string_lossy().into_owned();
    let (v2, v3) = (format!("{}-v2", f.alias), format!("{}-v3", f.alias));
    let plan = recompute(&f, "plan", &v2, &["--archive-url", &archive]);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let producing = produce(&f.topic, second);
    let (from_archive, _) = tokio::join!(
        async { recompute(&f, "run", &v2, &["--archive-url", &archive]) },
        producing
    );
    let from_archive = succeeded(&from_archive);
    assert!(
        from_archive["from_archive"].as_u64().unwrap() > 0,
        "{from_archive}"
    );
    let kafka_only = succeeded(&recompute(&f, "run", &v3, &["--source", "kafka"]));
    assert_eq!(kafka_only["from_archive"], 0, "{kafka_only}");
    // Verified against the live index while the live layer runs on: documents it changed
    // past the recompute's position are "ahead", every other one is equal.
    let verified = recompute(&f, "verify", &v2, &["--json"]);
    let report = succeeded(&verified);
    assert!(report["compared"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["unexpected"], 0, "{report}");

    // Users neither recompute has yet: the promote's catch-up creates them in v2.
    let fresh: Vec<Event> = generate(200, 78, 20, 1)
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e.user_id = Some(format!("fresh-{}", i % 20));
            e.anonymous_id = None;
            e
        })
        .collect();
    produce(&f.topic, &fresh).await;
    let before_third: Vec<Event> = first.iter().chain(second).chain(&fresh).cloned().collect();
    let all: Vec<Event> = before_third.iter().chain(third).cloned().collect();
    // The live layer stops (flush, commit); both recomputes catch up to its final commit.
    let total = before_third.len();
    f.wait_for_events(total as u64).await;
    terminate(&mut live);
    succeeded(&recompute(&f, "run", &v3, &["--source", "kafka"]));
    // A portal queries the alias all through the promotion: every answer is complete (all
    // the documents, every event counted in them, the users only the catch-up brought to v2),
    // from the old index and then from the new one, never an error or an empty page.
    let v1 = format!("{}-v1", f.alias);
    let expected = Answer {
        documents: documents_of(&f, &v1).await.len() as u64,
        events: total as u64,
        fresh_users: fresh
            .iter()
            .map(Event::partition_key)
            .collect::<std::collections::HashSet<_>>()
            .len() as u64,
    };
    let querying = Arc::new(AtomicBool::new(true));
    let portal = tokio::spawn(query_loop(f.store.clone(), querying.clone()));
    let promoted =
        tokio::task::block_in_place(|| recompute(&f, "promote", &v2, &["--archive-url", &archive]));
    let promoted = succeeded(&promoted);
    assert_eq!(promoted["to"], v2.as_str(), "{promoted}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    querying.store(false, Ordering::Relaxed);
    let answers = portal.await.unwrap();
    let by_index: BTreeMap<&str, usize> = answers.iter().fold(BTreeMap::new(), |mut m, a| {
        *m.entry(a.0.as_str()).or_default() += 1;
        m
    });
    assert!(
        by_index.contains_key(v1.as_str()) && by_index.contains_key(v2.as_str()),
        "the loop saw both sides of the switch: {by_index:?}"
    );
    let wrong: Vec<&(String, Result<Answer, String>)> = answers
        .iter()
        .filter(|(_, answer)| answer.as_ref() != Ok(&expected))
        .collect();
    assert!(
        wrong.is_empty(),
        "{expected:?} expected in every answer; {} were not, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );

    let live_docs = documents_of(&f, &format!("{}-v1", f.alias)).await;
    let (archive_docs, kafka_docs) = (documents_of(&f, &v2).await, documents_of(&f, &v3).await);
    let truth = ground_truth(&before_third);
    assert_eq!(
        diff(&live_docs, &truth),
        Vec::<String>::new(),
        "live against the ground truth"
    );
    assert_eq!(
        differences(&live_docs, &archive_docs),
        Vec::<String>::new(),
        "archive then Kafka"
    );
    assert_eq!(
        differences(&live_docs, &kafka_docs),
        Vec::<String>::new(),
        "Kafka only"
    );

    // The alias now reads the new index; the live layer, started again in its group, resumes
    // at its commit on it and folds the third part exactly once.
    assert_eq!(f.documents().await.len(), archive_docs.len());
    let mut live = f.spawn_speed(&live_args);
    produce(&f.topic, third).await;
    let docs = f.wait_for_events(all.len() as u64).await;
    assert_eq!(
        diff(&docs, &ground_truth(&all)),
        Vec::<String>::new(),
        "after promotion"
    );
    terminate(&mut live);

    // Rollback: v1 caught up from where it stopped, and the alias on it again.
    let back = succeeded(&recompute(
        &f,
        "rollback",
        &v2,
        &["--archive-url", &archive],
    ));
    assert_eq!(back["to"], format!("{}-v1", f.alias).as_str(), "{back}");
    let docs = f.documents().await;
    assert_eq!(
        diff(&docs, &ground_truth(&all)),
        Vec::<String>::new(),
        "after rollback"
    );
}

/// The identity stream's people folded by the live layer and by two recomputes: from the
/// archive (whose units hold the live layer's links, merges, refusals and forwarded events
/// beside the events, cut at arbitrary points of merges under way) then Kafka, and from Kafka
/// only. Each recompute replays those records by the live layer's rules, so every document,
/// pointers and identity state included, is the live one, and the promote switches to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_people_come_out_of_a_recompute_as_the_live_layer_has_them() {
    use common::identities::{identity_stream, people_once_equal, split, truth_of};
    let f = Fixture::new("recompute-identity", 6).await;
    let stream = identity_stream(120, 0x005e_ed1d);
    let truth = truth_of(&stream);
    let live_args = ["--flush-interval-secs", "0.3", "--idle-evict-secs", "0"];
    let mut live = f.spawn_speed(&live_args);
    let dir = std::env::temp_dir().join(format!("{}-archive", f.alias));
    // Archived twice while the live layer is merging (so units end between a link and its
    // merge), the last phase left in Kafka only.
    produce(&f.topic, &stream.phases[0]).await;
    produce(&f.topic, &stream.phases[1]).await;
    archive_topic(&f, &dir).await;
    produce(&f.topic, &stream.phases[2]).await;
    produce(&f.topic, &stream.retries).await;
    archive_topic(&f, &dir).await;
    produce(&f.topic, &stream.phases[3]).await;
    let (_, _, problems) = people_once_equal(&f, &truth, PATIENCE * 4).await;
    assert!(problems.is_empty(), "live: {}", problems.join("\n"));
    terminate(&mut live);
    let store = LocalFileSystem::new_with_prefix(&dir).unwrap();
    let identity_files = layout::committed_identity_files(&store, None)
        .await
        .unwrap();
    assert!(
        !identity_files.is_empty(),
        "the archive holds identity records"
    );

    let archive = dir.to_string_lossy().into_owned();
    let (v1, v2, v3) = (
        format!("{}-v1", f.alias),
        format!("{}-v2", f.alias),
        format!("{}-v3", f.alias),
    );
    let from_archive = succeeded(&recompute(&f, "run", &v2, &["--archive-url", &archive]));
    let kafka_only = succeeded(&recompute(&f, "run", &v3, &["--source", "kafka"]));
    eprintln!("from the archive: {from_archive}\nfrom Kafka: {kafka_only}");
    assert!(
        from_archive["identity_records"].as_u64().unwrap() > 0
            && from_archive["from_archive"].as_u64().unwrap() > 0,
        "{from_archive}"
    );
    let live_docs = documents_of(&f, &v1).await;
    let (_, pointers) = split(&live_docs);
    assert_eq!(
        pointers.len(),
        stream.linked.len(),
        "every linked device merged"
    );
    for (index, source) in [(&v2, "archive then Kafka"), (&v3, "Kafka only")] {
        let docs = documents_of(&f, index).await;
        assert_eq!(
            differences(&live_docs, &docs),
            Vec::<String>::new(),
            "{source}: every document of the live index, pointers and identity state included"
        );
        assert_eq!(docs.len(), live_docs.len(), "{source}: no document more");
    }
    assert_eq!(
        kafka_only["identity_records"], from_archive["identity_records"],
        "the same identity records from either source"
    );
    let report = succeeded(&recompute(&f, "verify", &v2, &["--json"]));
    assert_eq!(
        (
            &report["unexpected"],
            &report["only_live"],
            &report["only_new"]
        ),
        (&Value::from(0), &Value::from(0), &Value::from(0)),
        "{report}"
    );
    // Nothing stands in the way of promoting it: the people stay merged behind the alias.
    let promoted = succeeded(&recompute(&f, "promote", &v2, &["--archive-url", &archive]));
    assert_eq!(promoted["to"], v2.as_str(), "{promoted}");
    let (people, pointers) = split(&f.documents().await);
    assert_eq!(
        diff(&people, &truth),
        Vec::<String>::new(),
        "behind the alias"
    );
    assert_eq!(pointers.len(), stream.linked.len());

    // The live layer goes on against v2: a merged device's events forwarded, a new device
    // browsing, then merged at a login. A rollback catches v1 up through them: the people are
    // merged there as in v2.
    let mut live = f.spawn_speed(&live_args);
    let extra: Vec<pulse_core::Event> = [
        json!({"anonymous_id": "device-0-0", "event": "page_view"}),
        json!({"anonymous_id": "device-0-0", "event": "product_view", "product_id": "p1"}),
        json!({"anonymous_id": "device-0-9", "event": "product_view", "product_id": "p2"}),
        json!({"anonymous_id": "device-0-9", "user_id": "user-0", "event": "identify"}),
        json!({"anonymous_id": "device-0-9", "event": "add_to_cart", "cart_amount": "19.90"}),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, mut v)| {
        v["partner_id"] = json!("shop-a");
        v["message_id"] = json!(format!("after-promote-{i}"));
        common::identities::event(v)
    })
    .collect();
    let mut linked = stream.linked.clone();
    linked.insert("shop-a:device-0-9".into(), "shop-a:user-0".into());
    let mut phases = stream.phases.clone();
    phases.push(extra.clone());
    let after = common::identities::Stream {
        phases,
        retries: Vec::new(),
        linked,
    };
    let truth = truth_of(&after);
    produce(&f.topic, &extra).await;
    let (_, _, problems) = people_once_equal(&f, &truth, PATIENCE * 2).await;
    assert!(problems.is_empty(), "live on v2: {}", problems.join("\n"));
    terminate(&mut live);
    let back = succeeded(&recompute(
        &f,
        "rollback",
        &v2,
        &["--archive-url", &archive],
    ));
    assert_eq!(back["to"], v1.as_str(), "{back}");
    let (people, pointers) = split(&f.documents().await);
    assert_eq!(
        diff(&people, &truth),
        Vec::<String>::new(),
        "after the rollback"
    );
    assert_eq!(
        pointers.len(),
        after.linked.len(),
        "the new device merged in v1 too"
    );
}

/// Searches the alias until `querying` turns false: for each answer, the index it came from
/// and what it held (or the error).
async fn query_loop(
    store: pulse_speed::store::ProfileStore,
    querying: Arc<AtomicBool>,
) -> Vec<(String, Result<Answer, String>)> {
    let query = serde_json::json!({
        "size": 1, "track_total_hits": true, "query": {"match_all": {}},
        "aggs": {
            "events": {"sum": {"field": "event_count"}},
            "fresh": {"filter": {"prefix": {"user_id": "fresh-"}}},
        },
    });
    let mut answers = Vec::new();
    while querying.load(Ordering::Relaxed) {
        let answer = match store.search(query.clone()).await {
            Ok(body) => {
                let index = body["hits"]["hits"][0]["_index"].as_str().unwrap_or("none");
                let answer = Answer {
                    documents: body["hits"]["total"]["value"].as_u64().unwrap_or_default(),
                    events: body["aggregations"]["events"]["value"]
                        .as_f64()
                        .unwrap_or(-1.0) as u64,
                    fresh_users: body["aggregations"]["fresh"]["doc_count"]
                        .as_u64()
                        .unwrap_or_default(),
                };
                (index.to_string(), Ok(answer))
            }
            Err(e) => (String::new(), Err(e.to_string())),
        };
        answers.push(answer);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    answers
}

/// What one portal query through the alias found: the documents, the events they count, and
/// the users only the promote's catch-up wrote to the new index.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    documents: u64,
    events: u64,
    fresh_users: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_that_kafka_dropped_and_the_archive_lacks_is_refused_with_the_partition_named() {
    let f = Fixture::new("recompute-gap", 2).await;
    let events = generate(400, 5, 40, 2);
    let mut live = f.spawn_speed(&["--flush-interval-secs", "0.5"]);
    produce(&f.topic, &events).await;
    f.wait_for_events(events.len() as u64).await;
    terminate(&mut live);
    expire_records(&f.topic, 1, 20).await;

    // An empty archive: partition 1's first 20 offsets exist nowhere any more.
    let dir = std::env::temp_dir().join(format!("{}-empty-archive", f.alias));
    std::fs::create_dir_all(&dir).unwrap();
    let archive = dir.to_string_lossy().into_owned();
    let v2 = format!("{}-v2", f.alias);
    for command in ["plan", "run"] {
        let out = recompute(&f, command, &v2, &["--archive-url", &archive]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command} refuses");
        assert!(
            stderr.contains("partition 1 offsets 0..=19"),
            "{command} names the gap: {stderr}"
        );
        assert!(!stderr.contains("partition 0 offsets"), "{stderr}");
    }
    let plan = recompute(&f, "plan", &v2, &["--archive-url", &archive]);
    assert_eq!(plan.status.code(), Some(2), "plan exits 2 on a gap");
    // Kafka alone starts at what Kafka holds, so the operator can accept the loss knowingly.
    let kafka_only = succeeded(&recompute(&f, "run", &v2, &["--source", "kafka"]));
    assert_eq!(
        kafka_only["from_kafka"].as_u64(),
        Some(events.len() as u64 - 20),
        "{kafka_only}"
    );
}

/// A record whose fold panics (a bug in a model, say) stops the run; it is journaled as the
/// live layer journals one, and the next run passes it over instead of panicking there again
/// at every resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_panics_the_fold_is_passed_over_by_the_next_run() {
    let f = Fixture::new("recompute-poison", 2).await;
    let events = generate(600, 17, 60, 3);
    let mut live = f.spawn_speed(&["--flush-interval-secs", "0.5"]);
    produce(&f.topic, &events).await;
    f.wait_for_events(events.len() as u64).await;
    terminate(&mut live);
    let v2 = format!("{}-v2", f.alias);
    let state_dir = f.state_dir();
    let poison = events[300].message_id.clone();
    let args = [
        "--source",
        "kafka",
        "--state-dir",
        &state_dir,
        "--failpoint-panic-message-id",
        &poison,
    ];
    let out = recompute(&f, "run", &v2, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the panic stops the run: {stderr}");
    assert!(stderr.contains("failpoint: folding message_id"), "{stderr}");
    let again = succeeded(&recompute(&f, "run", &v2, &args));
    assert_eq!(
        again["unusable"], 1,
        "the journaled record is passed over: {again}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recompute_sigkilled_again_and_again_resumes_and_ends_identical() {
    let f = Fixture::new("recompute-kill", 4).await;
    let events = generate(8_000, 91, 400, 10);
    let mut live = f.spawn_speed(&["--flush-interval-secs", "0.5"]);
    // The first 5,000 in the archive, the rest only in Kafka: kills land in both phases.
    let (archived, recent) = events.split_at(5_000);
    produce(&f.topic, archived).await;
    let dir = std::env::temp_dir().join(format!("{}-archive", f.alias));
    let ranges = archive_topic(&f, &dir).await;
    produce(&f.topic, recent).await;
    f.wait_for_events(events.len() as u64).await;
    terminate(&mut live);
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for r in read_topic(&f.topic, events.len(), Duration::ZERO) {
        let end = ends.entry(r.partition).or_default();
        *end = (*end).max(r.offset);
    }
    let archive = dir.to_string_lossy().into_owned();
    let v2 = format!("{}-v2", f.alias);
    // Each kill lands where the failpoint says, whatever the machine's speed: at a random
    // record of the archive of partition 1, then of partition 3 (the archive is read
    // partition by partition), then twice among partition 0's Kafka records. Each point is
    // past where the run before it was killed, so every run reaches its point. Throttled, so
    // that flushes (and commits, every 0.5 s) land between the kills.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    println!("kill points seed {seed}");
    let pick = |salt: u64, from: i64, to: i64| -> i64 {
        // splitmix64: enough for a spread of points, reproducible from the printed seed.
        let mut z = seed.wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        from + ((z ^ (z >> 31)) % (to - from + 1) as u64) as i64
    };
    let (kafka_from, kafka_end) = (ranges[&0].last + 1, ends[&0]);
    assert!(
        kafka_end > kafka_from + 2,
        "partition 0 has records only in Kafka"
    );
    let first_kafka_kill = pick(3, kafka_from, (kafka_from + kafka_end) / 2);
    let kills = [
        (1, pick(1, ranges[&1].first + 1, ranges[&1].last)),
        (3, pick(2, ranges[&3].first + 1, ranges[&3].last)),
        (0, first_kafka_kill),
        (0, pick(4, first_kafka_kill + 1, kafka_end)),
    ];
    let args = ["--archive-url", &archive, "--max-events-per-sec", "2500"];

    // First a SIGTERM, a few seconds into a slow run: it flushes and commits what it folded,
    // makes the index searchable again and exits non-zero, since it did not get to the live
    // layer's commit (so no promote takes this index for a finished one).
    // At 300 events/s, 2 s stay inside partition 0's archive (about 1,250 records), well
    // before the first kill point (in partition 1's).
    let slow = ["--archive-url", &archive, "--max-events-per-sec", "300"];
    let child = recompute_command(&f, "run", &v2, &slow)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // SAFETY: kill only sends a signal to the child's pid, which has not been waited for.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exits non-zero, not by the signal: {stderr}"
    );
    assert!(
        stderr.contains("stopped before reaching the live layer's commit"),
        "{stderr}"
    );
    // Stopped while folding, not while planning: it flushed what it had folded.
    assert!(
        stderr.contains("stopped; flushing what was folded"),
        "{stderr}"
    );
    assert_eq!(
        refresh_interval(&v2).await,
        "1s",
        "searchable again after SIGTERM"
    );

    for (p, offset) in kills {
        let at = format!("{p}:{offset}");
        let mut killed_args = args.to_vec();
        killed_args.extend(["--failpoint-kill-at", &at]);
        let out = recompute(&f, "run", &v2, &killed_args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        std::fs::write(
            std::env::temp_dir().join(format!("recompute-{}-{p}-{offset}.log", f.alias)),
            stderr.as_bytes(),
        )
        .unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&out.status),
            Some(libc::SIGKILL),
            "the run is killed at {at}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("SIGKILL at partition {p} offset {offset}")),
            "{stderr}"
        );
    }
    assert_eq!(
        refresh_interval(&v2).await,
        "-1",
        "a killed run leaves the index in bulk-load mode"
    );
    let last = succeeded(&recompute(&f, "run", &v2, &args));
    assert_eq!(
        refresh_interval(&v2).await,
        "1s",
        "a run that ends makes the index searchable again"
    );
    let read = last["from_archive"].as_u64().unwrap() + last["from_kafka"].as_u64().unwrap();
    assert!(
        read < events.len() as u64,
        "the last run resumed instead of starting over: {last}"
    );
    let live_docs = documents_of(&f, &format!("{}-v1", f.alias)).await;
    assert_eq!(
        diff(&live_docs, &ground_truth(&events)),
        Vec::<String>::new()
    );
    assert_eq!(
        differences(&live_docs, &documents_of(&f, &v2).await),
        Vec::<String>::new(),
        "killed four times, the recompute ends identical to the live layer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_change_is_recomputed_verified_to_change_only_its_fields_promoted_and_rolled_back()
{
    let f = Fixture::new("recompute-model", 2).await;
    let events = generate(2_000, 23, 100, 10);
    let mut live = f.spawn_speed(&["--flush-interval-secs", "0.5"]);
    produce(&f.topic, &events).await;
    f.wait_for_events(events.len() as u64).await;
    terminate(&mut live);
    let v1 = format!("{}-v1", f.alias);
    let v2 = format!("{}-v2", f.alias);
    // The new model: MODEL3 over 2 days instead of 7.
    let new_model = ["--source", "kafka", "--window-days", "2"];
    succeeded(&recompute(&f, "run", &v2, &new_model));

    let strict = recompute(&f, "verify", &v2, &new_model);
    assert_eq!(
        strict.status.code(),
        Some(1),
        "a changed model is a difference"
    );
    assert!(String::from_utf8_lossy(&strict.stdout).contains("gender_top_7d"));
    let mut expecting = new_model.to_vec();
    expecting.extend([
        "--expect-changed",
        "gender_top_7d",
        "--expect-changed",
        "models.MODEL3",
        "--json",
    ]);
    let report = succeeded(&recompute(&f, "verify", &v2, &expecting));
    let fields: Vec<&String> = report["differing_fields"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert!(
        fields
            .iter()
            .all(|k| *k == "gender_top_7d" || *k == "models.MODEL3"),
        "only the model's fields differ: {report}"
    );
    assert!(
        report["differing_fields"]["gender_top_7d"]
            .as_u64()
            .unwrap()
            > 0,
        "{report}"
    );
    assert_eq!(report["only_live"], 0);
    assert_eq!(report["only_new"], 0);

    // Promoted: portals read the new model. Rolled back (with the old model's flags): the old.
    succeeded(&recompute(&f, "promote", &v2, &new_model));
    let now = chrono::Utc::now();
    let truth = ground_truth(&events);
    let window = |docs: &HashMap<String, Value>, days: i64| -> Vec<String> {
        docs.iter()
            .filter(|(id, d)| {
                let want = truth[*id].top_gender_window(now, days);
                d["gender_top_7d"].as_str() != want.as_deref()
            })
            .map(|(id, _)| id.clone())
            .collect()
    };
    let promoted = f.documents().await;
    assert_eq!(promoted.len(), truth.len());
    assert_eq!(
        window(&promoted, 2),
        Vec::<String>::new(),
        "the 2-day model behind the alias"
    );
    let back = succeeded(&recompute(&f, "rollback", &v2, &["--source", "kafka"]));
    assert_eq!(back["to"], v1.as_str());
    let rolled_back = f.documents().await;
    assert_eq!(
        window(&rolled_back, 7),
        Vec::<String>::new(),
        "the 7-day model again"
    );
}

/// `pulse-speed recompute cleanup` on this fixture's alias, as JSON.
fn cleanup(f: &Fixture, extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pulse-speed"))
        .args(["recompute", "cleanup", "--json"])
        .args(["--kafka-brokers", &brokers(), "--es-url", &es_url()])
        .args(["--profiles-alias", &f.alias])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run pulse-speed recompute cleanup");
    succeeded(&out)
}

/// The `index.refresh_interval` set on `index`.
async fn refresh_interval(index: &str) -> String {
    let url = format!("{}/{index}/_settings/index.refresh_interval", es_url());
    let body: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    body[index]["settings"]["index"]["refresh_interval"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn index_exists(index: &str) -> bool {
    let url = format!("{}/{index}", es_url());
    reqwest::Client::new()
        .head(url)
        .send()
        .await
        .unwrap()
        .status()
        .is_success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_indices_no_alias_points_to_but_keeps_the_live_previous_and_young() {
    let f = Fixture::new("recompute-cleanup", 2).await;
    let events = generate(300, 29, 30, 3);
    let mut live = f.spawn_speed(&["--flush-interval-secs", "0.5"]);
    produce(&f.topic, &events).await;
    f.wait_for_events(events.len() as u64).await;
    terminate(&mut live);
    let (v1, v2, v3) = (
        format!("{}-v1", f.alias),
        format!("{}-v2", f.alias),
        format!("{}-v3", f.alias),
    );
    let kafka = ["--source", "kafka"];
    // A promote's catch-up refuses an index that does not exist: it is built first.
    let refused = recompute(&f, "promote", &v2, &kafka);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    succeeded(&recompute(&f, "run", &v2, &kafka));
    succeeded(&recompute(&f, "promote", &v2, &kafka));
    succeeded(&recompute(&f, "run", &v3, &kafka));

    // v2 is live, v1 is what a rollback goes back to, v3 was just built: by default nothing
    // goes (v3 may be a recompute running now).
    let report = cleanup(&f, &["--yes"]);
    assert_eq!(report["live"], v2.as_str(), "{report}");
    assert_eq!(report["previous"], v1.as_str(), "{report}");
    assert_eq!(report["indices"], serde_json::json!([]), "{report}");
    assert_eq!(report["too_young"], serde_json::json!([v3]), "{report}");
    assert!(index_exists(&v3).await);

    // Old enough: a dry run names v3 and its group, and deletes nothing.
    let dry = cleanup(&f, &["--min-age-hours", "0"]);
    assert_eq!(dry["indices"], serde_json::json!([v3]), "{dry}");
    let v3_group = format!("recompute-{v3}");
    assert_eq!(dry["groups"], serde_json::json!([v3_group]), "{dry}");
    assert_eq!(dry["deleted"], false);
    assert!(index_exists(&v3).await);

    let done = cleanup(&f, &["--min-age-hours", "0", "--yes"]);
    assert_eq!(done["deleted"], true, "{done}");
    assert!(!index_exists(&v3).await, "v3 deleted");
    assert!(index_exists(&v1).await, "the rollback's index kept");
    assert!(index_exists(&v2).await, "the live index kept");
    let again = cleanup(&f, &["--min-age-hours", "0"]);
    assert_eq!(
        again["groups"],
        serde_json::json!([]),
        "v3's group deleted: {again}"
    );

    // Asked for: the previous index too, and its group; the live one stays.
    let all = cleanup(&f, &["--min-age-hours", "0", "--include-previous", "--yes"]);
    assert_eq!(all["indices"], serde_json::json!([v1]), "{all}");
    assert!(!index_exists(&v1).await);
    assert_eq!(f.documents().await.len(), ground_truth(&events).len());
}

/// The lease document of `index`, if there is one.
async fn lease_of(f: &Fixture, index: &str) -> Option<Value> {
    let url = format!("{}/{}.leases/_doc/{index}", es_url(), f.alias);
    let body: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    (body["found"] == true).then(|| body["_source"].clone())
}

/// A run holds its index's lease while it folds: a second run of the index is refused, and a
/// cleanup keeps the index however old it is, naming who holds it. Released at the end (here
/// a SIGTERM), after which the cleanup deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_recompute_holds_its_index_against_a_second_run_and_a_cleanup() {
    let f = Fixture::new("recompute-lease", 2).await;
    let events = generate(1_500, 31, 100, 2);
    let mut live = f.spawn_speed(&["--flush-interval-secs", "0.5"]);
    produce(&f.topic, &events).await;
    f.wait_for_events(events.len() as u64).await;
    terminate(&mut live);
    let v2 = format!("{}-v2", f.alias);
    let slow = ["--source", "kafka", "--max-events-per-sec", "100"];
    let mut running = recompute_command(&f, "run", &v2, &slow)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lease = None;
    for _ in 0..300 {
        lease = lease_of(&f, &v2).await;
        if lease.is_some() && index_exists(&v2).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease = lease.expect("the run took a lease");
    assert_eq!(lease["purpose"], "run", "{lease}");
    assert_eq!(lease["pid"], running.id(), "{lease}");

    let second = recompute(&f, "run", &v2, &["--source", "kafka"]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "a second run of the index is refused"
    );
    assert!(
        stderr.contains(&format!("index {v2} is in use: its lease is held by run")),
        "{stderr}"
    );
    let report = cleanup(&f, &["--min-age-hours", "0", "--yes"]);
    assert_eq!(report["indices"], serde_json::json!([]), "{report}");
    assert_eq!(report["in_use"][0][0], v2.as_str(), "{report}");
    assert!(
        index_exists(&v2).await,
        "the running recompute's index is kept"
    );
    assert!(
        running.try_wait().unwrap().is_none(),
        "the run goes on after the cleanup"
    );

    // SAFETY: kill only sends a signal to the child's pid, which has not been waited for.
    assert_eq!(unsafe { libc::kill(running.id() as i32, libc::SIGTERM) }, 0);
    let status = running.wait().unwrap();
    assert_eq!(status.code(), Some(1), "stopped before the live commit");
    assert_eq!(lease_of(&f, &v2).await, None, "released at the end");
    let report = cleanup(&f, &["--min-age-hours", "0", "--yes"]);
    assert_eq!(report["indices"], serde_json::json!([v2]), "{report}");
    assert!(!index_exists(&v2).await);
}

/// Another process writes into the index a recompute builds (here a live layer pointed at it
/// by mistake, ahead of the run): the run meets documents newer than its own (409). It does
/// not re-read as the live layer would; it fails, naming the partitions, instead of exiting 0
/// with those partitions never committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recompute_that_meets_another_writer_in_its_index_fails_and_says_so() {
    let f = Fixture::new("recompute-writer", 2).await;
    let events = generate(1_200, 37, 60, 2);
    let mut live = f.spawn_speed(&["--flush-interval-secs", "0.5"]);
    produce(&f.topic, &events).await;
    f.wait_for_events(events.len() as u64).await;
    terminate(&mut live);
    let v2 = format!("{}-v2", f.alias);
    let slow = ["--source", "kafka", "--max-events-per-sec", "300"];
    let running = recompute_command(&f, "run", &v2, &slow)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while !index_exists(&v2).await {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second speed layer, in a group of its own, writing straight into v2: it folds the
    // whole topic at once, well ahead of the throttled run.
    let mut intruder = f.spawn_speed(&[
        "--profiles-alias",
        &v2,
        "--group",
        &unique("intruder"),
        "--flush-interval-secs",
        "0.3",
    ]);
    let out = running.wait_with_output().unwrap();
    terminate(&mut intruder);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run fails: {stderr}");
    assert!(
        stderr.contains(&format!(
            "index {v2} holds documents newer than this run wrote on partitions"
        )),
        "{stderr}"
    );
}

/// An orchestrator restarts the live layer while `promote` catches the new index up: the
/// events it folds and commits then are in the old index only. Just before the swap the
/// promote sees the group changed, refuses, and leaves the alias on the old index. Once the
/// live layer is stopped again, promote hands over exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_layer_started_during_the_promote_makes_it_refuse_and_leave_the_alias() {
    let f = Fixture::new("recompute-restart", 2).await;
    let events = generate(2_400, 53, 150, 2);
    let (first, rest) = events.split_at(1_200);
    let (second, third) = rest.split_at(600);
    let live_args = ["--flush-interval-secs", "0.5"];
    let mut live = f.spawn_speed(&live_args);
    produce(&f.topic, first).await;
    f.wait_for_events(first.len() as u64).await;
    let (v1, v2) = (format!("{}-v1", f.alias), format!("{}-v2", f.alias));
    succeeded(&recompute(&f, "run", &v2, &["--source", "kafka"]));
    // More for the catch-up to fold, then the live layer stops: its commit is final.
    produce(&f.topic, second).await;
    f.wait_for_events((first.len() + second.len()) as u64).await;
    terminate(&mut live);
    // A catch-up of 600 events at 100 per second: six seconds, in which the live layer is
    // started again (by an orchestrator) and folds new events.
    let promoting = recompute_command(
        &f,
        "promote",
        &v2,
        &["--source", "kafka", "--max-events-per-sec", "100"],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut live = f.spawn_speed(&live_args);
    produce(&f.topic, third).await;
    f.wait_for_events(events.len() as u64).await;
    let out = promoting.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "promote refuses: {stderr}");
    assert!(
        stderr.contains("changed during the catch-up") && stderr.contains("left on the old index"),
        "{stderr}"
    );
    let alias_url = format!("{}/_alias/{}", es_url(), f.alias);
    let aliases: Value = reqwest::get(&alias_url)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        aliases.get(&v1).is_some(),
        "the alias still reads v1: {aliases}"
    );
    assert!(aliases.get(&v2).is_none(), "{aliases}");

    // Stopped again: promote hands over exactly, nothing the restarted layer folded missing.
    terminate(&mut live);
    let switched = succeeded(&recompute(&f, "promote", &v2, &["--source", "kafka"]));
    assert_eq!(switched["to"], v2.as_str(), "{switched}");
    let docs = f.documents().await;
    assert_eq!(diff(&docs, &ground_truth(&events)), Vec::<String>::new());
}
