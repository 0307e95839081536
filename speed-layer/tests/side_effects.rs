//! Side effects exactly once, against real Kafka and Elasticsearch with the real `pulse-speed`
//! binary: what the speed layer sends beside its profiles (triggers, dead letters) is
//! acknowledged by Kafka, record by record, before the watermark or the offset that covers its
//! event moves, so a crash or a refusing topic neither loses a push nor sends it twice.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;
use common::*;
use pulse_core::{parse_event, Event, ParseContext};
use pulse_speed::dedupe::DedupePolicy;
use pulse_speed::profile::{Profile, Watermark};
use pulse_speed::store::{DocWrite, ItemOutcome};
use pulse_speed::triggers::RuleSet;
use pulse_tests::refusing_proxy::BulkRefusingProxy;

/// `pulse-speed run` with `args` and a metrics endpoint of its own; its port.
fn spawn_measured(f: &Fixture, args: &[&str]) -> (std::process::Child, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut all = args.to_vec();
    all.extend(["--metrics-listen", &listen]);
    (f.spawn_speed(&all), port)
}

/// Waits until the speed layer serving metrics on `port` has folded `n` events.
async fn wait_folded(port: u16, n: usize) {
    poll_until(port, "/metrics", |_, page| {
        counter(page, "pulse_speed_events_folded_total") >= n as f64
    })
    .await;
}

/// The idempotency keys of the triggers in `topic` (waiting for `n`, then a little longer).
fn fired_keys(topic: &str, n: usize) -> BTreeSet<String> {
    read_topic(topic, n, Duration::from_secs(2))
        .iter()
        .map(|r| {
            r.json()["idempotency_key"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

fn carts(users: usize) -> Vec<Event> {
    (0..users)
        .map(|i| {
            let json = format!(
                r#"{{"event":"add_to_cart","partner_id":"shop","user_id":"u{i}","message_id":"cart-{i}","cart_amount":"12.50"}}"#
            );
            parse_event(&json, &ParseContext::now()).expect("valid event")
        })
        .collect()
}

/// `users` carts, a rules file (on disk, for `--rules-file`) that fires on each, and the
/// idempotency keys of their triggers.
fn carts_with_rule(f: &Fixture, users: usize) -> (String, Vec<Event>, BTreeSet<String>) {
    let rules_path = std::env::temp_dir().join(format!("{}.toml", f.alias));
    std::fs::write(&rules_path, CART_RULE).unwrap();
    let rules = RuleSet::from_toml(CART_RULE).unwrap();
    let events = carts(users);
    let keys = events
        .iter()
        .map(|e| rules.rules[0].idempotency_key(e))
        .collect();
    (rules_path.to_string_lossy().into_owned(), events, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triggers_topic_that_refuses_writes_holds_the_watermarks_back_and_no_push_is_lost() {
    let f = Fixture::new("refuse", 2).await;
    let (rules_file, events, expected) = carts_with_rule(&f, 6);
    // The triggers topic takes no record of a trigger's size, as a topic with too small a
    // max.message.bytes (or one the speed layer may not write to) refuses it for good.
    set_topic_config(&f.triggers, "max.message.bytes", "64").await;

    let args = [
        "--rules-file",
        &rules_file,
        "--flush-interval-secs",
        "0.2",
        "--max-backoff-secs",
        "0.5",
        // The restart gets the killed member's partitions after this, not after 45 s.
        "--kafka-opt",
        "session.timeout.ms=6000",
    ];
    let (mut speed, port) = spawn_measured(&f, &args);
    produce(&f.topic, &events).await;

    // Readiness says why, the refusals are counted, and no profile is stored: a watermark
    // that covers the carts would make a re-read skip them, and their pushes with them.
    let (status, reason) =
        poll_until(port, "/readyz", |_, body| body.contains("not acknowledged")).await;
    assert_eq!(status, 503, "{reason}");
    let (_, metrics) = poll_until(port, "/metrics", |_, body| {
        body.contains("pulse_outbox_undelivered_total")
    })
    .await;
    assert!(
        metrics.contains("pulse_outbox_undelivered_total"),
        "{metrics}"
    );
    // Several flush intervals and retries go by.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        f.documents().await.is_empty(),
        "no profile is stored before its triggers are in Kafka"
    );

    // The process dies with the refused triggers in memory; the operator fixes the topic.
    speed.kill().unwrap();
    let _ = speed.wait();
    set_topic_config(&f.triggers, "max.message.bytes", "1048588").await;
    restart_stores_every_cart_once_and_every_push(&f, &args, &events, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_document_met_by_a_fresh_group_re_reads_its_partition_and_loses_nothing() {
    // One partition, many users: a re-read drops every dirty profile of the partition, so
    // the others' events are lost unless the re-read really starts again at the beginning.
    let f = Fixture::new("newer", 1).await;
    let events = generate(400, 12, 30, 1);
    let (mut speed, port) = spawn_measured(&f, &["--flush-interval-secs", "8"]);
    produce(&f.topic, &events).await;
    wait_folded(port, events.len()).await;

    // Before the first flush (nothing committed yet), another writer stores a newer version
    // of one user's profile, as a replica that took the partition over would.
    let victim = &events[0];
    let id = victim.partition_key();
    let kinds = pulse_speed::models::registry();
    let mut newer = Profile::new(victim, &kinds);
    let at = Watermark {
        partition: 0,
        offset: 1_000_000,
    };
    newer.fold(victim, at, &DedupePolicy::default());
    let doc = serde_json::to_vec(&newer.to_document(&kinds, Utc::now())).unwrap();
    let write = DocWrite {
        id: id.clone(),
        version: at.offset,
        doc,
    };
    let written = f.store.bulk_write(&[write]).await.unwrap();
    assert_eq!(written, [ItemOutcome::Written]);

    // The flush meets the newer document (409): the partition is read again from its first
    // record on top of it, and every other user's profile ends exact.
    let others: Vec<Event> = events
        .iter()
        .filter(|e| e.partition_key() != id)
        .cloned()
        .collect();
    let mut docs = f.wait_for_events(others.len() as u64 + 1).await;
    let (_, page) = poll_until(port, "/metrics", |_, page| {
        counter(page, "pulse_speed_docs_stale_total") >= 1.0
    })
    .await;
    assert!(
        counter(&page, "pulse_speed_docs_stale_total") >= 1.0,
        "the 409 was met"
    );
    let seeded = docs.remove(&id).expect("the newer document");
    assert_eq!(
        seeded["watermark"]["offset"], 1_000_000,
        "the newer document stands"
    );
    let problems = diff(&docs, &ground_truth(&others));
    assert!(problems.is_empty(), "{problems:#?}");
    terminate(&mut speed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_refusing_bulk_but_answering_mget_is_not_ready_and_is_retried_at_the_backoff()
{
    let f = Fixture::new("bulk429", 2).await;
    let proxy = BulkRefusingProxy::start(&es_url()).await;
    proxy.refuse_bulk(true);
    let events = generate(600, 23, 60, 1);
    let (first, second) = events.split_at(300);
    // A flush every 2 s; a failed one is tried again within 0.2 s.
    let args = [
        "--es-url",
        &proxy.url,
        "--flush-interval-secs",
        "2",
        "--max-backoff-secs",
        "0.2",
    ];
    let (mut speed, port) = spawn_measured(&f, &args);
    produce(&f.topic, first).await;
    wait_until(|| proxy.refused() >= 1).await;
    // New users keep coming: their profiles load (mget works), which must not make the
    // layer look ready while every write is refused.
    produce(&f.topic, second).await;
    poll_until(port, "/metrics", |_, page| {
        counter(page, "pulse_speed_events_folded_total") >= events.len() as f64
    })
    .await;
    let (status, reason) = poll_until(port, "/readyz", |_, _| true).await;
    assert_eq!(status, 503, "{reason}");
    assert!(reason.contains("_bulk"), "{reason}");
    assert!(
        f.documents().await.is_empty(),
        "nothing is written while _bulk is refused"
    );
    // Retried at the backoff, not once per flush interval: over 4 s at most two tries would
    // fall due by the interval.
    let before = proxy.refused();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let tries = proxy.refused() - before;
    assert!(tries >= 6, "{tries} tries in 4 s");

    proxy.refuse_bulk(false);
    let docs = f.wait_for_events(events.len() as u64).await;
    let problems = diff(&docs, &ground_truth(&events));
    assert!(problems.is_empty(), "{problems:#?}");
    let (status, _) = poll_until(port, "/readyz", |s, _| s == 200).await;
    assert_eq!(status, 200);
    terminate(&mut speed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_unflushed_profiles_stop_reading_until_a_flush_gets_through() {
    let f = Fixture::new("maxdirty", 1).await;
    let proxy = BulkRefusingProxy::start(&es_url()).await;
    proxy.refuse_bulk(true);
    let events = generate(2_000, 29, 400, 1);
    let args = [
        "--es-url",
        &proxy.url,
        "--flush-interval-secs",
        "0.5",
        "--flush-max-dirty",
        "50",
        "--max-batch",
        "20",
        "--max-backoff-secs",
        "0.2",
    ];
    let (mut speed, port) = spawn_measured(&f, &args);
    produce(&f.topic, &events).await;
    wait_until(|| proxy.refused() >= 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Reading stopped at the bound (one batch past it at most): the lag grows, memory does not.
    let (_, page) = poll_until(port, "/metrics", |_, _| true).await;
    let dirty = counter(&page, "pulse_speed_profiles_dirty");
    let folded = counter(&page, "pulse_speed_events_folded_total");
    assert!((50.0..70.0).contains(&dirty), "{dirty} dirty profiles");
    assert!(
        folded < events.len() as f64,
        "{folded} of {} folded",
        events.len()
    );

    proxy.refuse_bulk(false);
    let docs = f.wait_for_events(events.len() as u64).await;
    let problems = diff(&docs, &ground_truth(&events));
    assert!(problems.is_empty(), "{problems:#?}");
    terminate(&mut speed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_profiles_are_evicted_after_a_flush_and_reloaded_when_seen_again() {
    let f = Fixture::new("evict", 2).await;
    let events = generate(1_200, 31, 100, 1);
    let (first, second) = events.split_at(600);
    // Every clean profile goes after each flush.
    let args = ["--flush-interval-secs", "0.5", "--idle-evict-secs", "0"];
    let (mut speed, port) = spawn_measured(&f, &args);
    produce(&f.topic, first).await;
    f.wait_for_events(first.len() as u64).await;
    let (_, page) = poll_until(port, "/metrics", |_, page| {
        counter(page, "pulse_speed_profiles_in_memory") == 0.0
    })
    .await;
    let first_users = ground_truth(first);
    let users_first = first_users.len() as f64;
    assert!(counter(&page, "pulse_speed_profiles_evicted_total") >= users_first);
    assert_eq!(counter(&page, "pulse_speed_profiles_in_memory"), 0.0);

    // The same users again: loaded from Elasticsearch (batched mget), never taken as new.
    produce(&f.topic, second).await;
    let docs = f.wait_for_events(events.len() as u64).await;
    let (_, page) = poll_until(port, "/metrics", |_, _| true).await;
    let returning = ground_truth(second)
        .keys()
        .filter(|id| first_users.contains_key(*id))
        .count() as f64;
    assert!(returning > 0.0);
    assert!(counter(&page, "pulse_speed_profiles_loaded_total") >= returning);
    let problems = diff(&docs, &ground_truth(&events));
    assert!(problems.is_empty(), "{problems:#?}");
    terminate(&mut speed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_and_commits_so_a_restart_reads_nothing_again() {
    let f = Fixture::new("final-flush", 2).await;
    let events = generate(800, 37, 80, 1);
    // No flush would come for an hour: only the final flush on SIGTERM writes the profiles.
    let (mut speed, port) = spawn_measured(&f, &["--flush-interval-secs", "3600"]);
    produce(&f.topic, &events).await;
    wait_folded(port, events.len()).await;
    assert!(
        f.documents().await.is_empty(),
        "nothing flushed before the stop"
    );
    let status = terminate_in_time(&mut speed).await;
    assert!(status.success(), "{status}");
    let docs = f.documents().await;
    let problems = diff(&docs, &ground_truth(&events));
    assert!(problems.is_empty(), "{problems:#?}");

    // The commit went with the flush: a restart in the same group reads nothing again.
    let (mut speed, restart_port) = spawn_measured(&f, &[]);
    let sentinel = generate(1, 41, 1, 1);
    produce(&f.topic, &sentinel).await;
    wait_folded(restart_port, 1).await;
    let (_, page) = poll_until(restart_port, "/metrics", |_, _| true).await;
    assert_eq!(
        counter(&page, "pulse_speed_events_folded_total"),
        1.0,
        "only the new event"
    );
    assert_eq!(
        counter(&page, "pulse_speed_events_skipped_total"),
        0.0,
        "no record was read again"
    );
    terminate(&mut speed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_fails_for_good_stops_the_speed_layer_and_the_restart_loses_nothing() {
    let f = Fixture::new("fatal", 2).await;
    let (rules_file, events, expected) = carts_with_rule(&f, 8);
    let args = [
        "--rules-file",
        &rules_file,
        "--flush-interval-secs",
        "0.2",
        "--kafka-opt",
        "session.timeout.ms=6000",
    ];
    // The idempotent producer fails for good at the fifth cart, as after an out-of-sequence
    // answer: it will never deliver again, so waiting (readiness false) would hold the
    // partitions forever. The process stops by itself and says why.
    let mut with_failpoint = args.to_vec();
    with_failpoint.extend(["--failpoint-fatal-producer-message-id", "cart-4"]);
    let mut speed = f.spawn_speed(&with_failpoint);
    produce(&f.topic, &events).await;
    let status = wait_exit(&mut speed).await;
    assert!(
        !status.success(),
        "a fatal producer error exits non-zero: {status}"
    );
    let log = std::fs::read_to_string(pulse_tests::process::log_path(&format!(
        "speed-{}",
        f.alias
    )))
    .unwrap_or_default();
    assert!(log.contains("failed for good"), "the log says why:\n{log}");

    // The restart, with a fresh producer, re-reads what was not committed: every profile is
    // stored once and every cart's trigger is in Kafka.
    restart_stores_every_cart_once_and_every_push(&f, &args, &events, &expected).await;
}

/// Starts the speed layer again with `args`: every cart's profile is stored, folded once,
/// every trigger is in Kafka, and it is ready.
async fn restart_stores_every_cart_once_and_every_push(
    f: &Fixture,
    args: &[&str],
    events: &[Event],
    expected: &BTreeSet<String>,
) {
    let (mut speed, port) = spawn_measured(f, args);
    let docs = f.wait_for_events(events.len() as u64).await;
    assert_eq!(docs.len(), events.len(), "every profile is stored");
    for doc in docs.values() {
        assert_eq!(doc["event_count"], 1, "each cart folded once: {doc}");
    }
    assert_eq!(
        &fired_keys(&f.triggers, expected.len()),
        expected,
        "every cart's trigger is in Kafka"
    );
    let (status, _) = poll_until(port, "/readyz", |s, _| s == 200).await;
    assert_eq!(status, 200);
    terminate(&mut speed);
}
