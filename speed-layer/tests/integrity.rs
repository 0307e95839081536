//! Integrity under retries and hostile partners, against real Kafka and Elasticsearch with the
//! real `pulse-speed` and `pulse-notifier` binaries: client retries count once (profiles and
//! triggers), one partner cannot exhaust the index's fields or suppress another's pushes,
//! poison values and panics are dead-lettered while the service goes on, documents
//! Elasticsearch refuses are dead-lettered, and the README's portal queries are right.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::*;
use pulse_core::{parse_event, Event, ParseContext};
use pulse_speed::triggers::RuleSet;
use serde_json::{json, Value};

fn ev(v: Value) -> Event {
    parse_event(&v.to_string(), &ParseContext::now()).expect("valid event")
}

async fn ready_status(port: u16) -> Option<u16> {
    let url = format!("http://127.0.0.1:{port}/readyz");
    match reqwest::get(url).await {
        Ok(r) => Some(r.status().as_u16()),
        Err(_) => None,
    }
}

/// Waits until the child's /readyz answers 200 (or PATIENCE).
async fn wait_ready(port: u16) -> Option<u16> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = ready_status(port).await;
        if status == Some(200) || Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Replaces the fixture's index with one created with `mappings` (merged over the index
/// template, as Elasticsearch does), behind the fixture's alias.
async fn recreate_index(f: &Fixture, mappings: Value) {
    let url = format!("{}/{}-v1", es_url(), f.alias);
    let http = reqwest::Client::new();
    http.delete(&url).send().await.unwrap();
    let created = http
        .put(&url)
        .json(&json!({"mappings": mappings, "aliases": {&f.alias: {"is_write_index": true}}}))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{:?}", created.text().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_retries_count_once_in_profiles_and_triggers_for_each_partner() {
    // One partition: the sentinel below is folded only after everything before it.
    let f = Fixture::new("retry", 1).await;
    let rules_path = std::env::temp_dir().join(format!("{}.toml", f.alias));
    std::fs::write(&rules_path, CART_RULE).unwrap();
    let rules = RuleSet::from_toml(CART_RULE).unwrap();

    let mut events = generate(1_500, 41, 150, 3);
    // Two partners use the same message ids for the same user id: two different events.
    for partner in ["shop-a", "shop-b"] {
        events.push(ev(
            json!({"event": "add_to_cart", "partner_id": partner, "user_id": "shared",
            "message_id": "cart-1", "cart_amount": "100"}),
        ));
        events.push(ev(
            json!({"event": "purchase", "partner_id": partner, "user_id": "shared",
            "message_id": "order-1001", "cart_amount": "250.10"}),
        ));
    }
    let truth = ground_truth(&events);
    let carts: Vec<&Event> = events.iter().filter(|e| e.event == "add_to_cart").collect();
    let mut want_keys: Vec<String> = carts
        .iter()
        .map(|e| rules.rules[0].idempotency_key(e))
        .collect();
    want_keys.sort();
    assert_eq!(
        want_keys.len(),
        {
            let mut k = want_keys.clone();
            k.dedup();
            k.len()
        },
        "the two partners' cart-1 get two keys"
    );

    let (url, received) = webhook(StatusCode::OK).await;
    // Generated events are spread over days: no age limit, every cart counts here.
    let mut notifier = f.spawn_notifier(
        &url,
        &["--rate-limit-secs", "0", "--max-trigger-age-secs", "0"],
    );
    // Evict every clean profile after each flush: the retries below meet profiles reloaded
    // from Elasticsearch, so the remembered ids must have been stored with the documents.
    let speed_args = [
        "--rules-file",
        rules_path.to_str().unwrap(),
        "--flush-interval-secs",
        "0.5",
        "--idle-evict-secs",
        "0",
    ];
    let mut speed = f.spawn_speed(&speed_args);
    produce(&f.topic, &events).await;
    let docs = f.wait_for_events(events.len() as u64).await;
    assert!(diff(&docs, &truth).is_empty(), "{:?}", diff(&docs, &truth));

    // Every client retries everything (same message ids, later receive time), and the speed
    // layer is SIGKILLed in the middle of the retries.
    let retried: Vec<Event> = events
        .iter()
        .map(|e| {
            let mut r = e.clone();
            r.received_at += chrono::Duration::seconds(30);
            r
        })
        .collect();
    let (first, second) = retried.split_at(retried.len() / 2);
    produce(&f.topic, first).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    speed.kill().unwrap();
    let _ = speed.wait();
    produce(&f.topic, second).await;
    let sentinel = ev(json!({"event": "page_view", "partner_id": "shop-a", "user_id": "sentinel"}));
    produce(&f.topic, std::slice::from_ref(&sentinel)).await;
    let mut speed = f.spawn_speed(&speed_args);
    let docs = f.wait_for_events(events.len() as u64 + 1).await;
    let mut all = events.clone();
    all.push(sentinel);
    let problems = diff(&docs, &ground_truth(&all));
    assert!(
        problems.is_empty(),
        "retried events were counted again:\n{}",
        problems.join("\n")
    );
    assert_eq!(docs["shop-a:shared"]["total_purchases"], json!("250.1"));
    assert_eq!(docs["shop-b:shared"]["total_purchases"], json!("250.1"));

    // Each distinct add_to_cart was pushed once, both partners' cart-1 included, and the
    // retries fired nothing (the first copy was committed before the retries arrived).
    wait_until(|| received.keys().len() >= want_keys.len()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    terminate(&mut speed);
    terminate(&mut notifier);
    let mut got = received.keys();
    got.sort();
    assert_eq!(got, want_keys, "each qualifying event pushed exactly once");
    let fired = read_topic(&f.triggers, want_keys.len(), Duration::from_secs(1));
    let mut fired_keys: Vec<String> = fired
        .iter()
        .map(|r| r.json()["idempotency_key"].as_str().unwrap().to_string())
        .collect();
    fired_keys.sort();
    assert_eq!(
        fired_keys, want_keys,
        "the speed layer fired each qualifying event once: no retry reached the triggers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_event_names_from_one_partner_leave_the_index_usable_for_others() {
    let f = Fixture::new("names", 4).await;
    let profiles_dlq = create_topic("sp-names-pdlq", 1).await;
    let mut events: Vec<Event> = (0..1_100)
        .map(|i| {
            ev(
                json!({"event": format!("spam_event_{i:04}"), "partner_id": "shop-a",
                "user_id": format!("spammer-{}", i % 11)}),
            )
        })
        .collect();
    events.extend((0..3_000).map(|i| {
        ev(json!({"event": format!("bulk_{i}"), "partner_id": "shop-a", "user_id": "spammer-x"}))
    }));
    // After the flood, another partner's brand-new event type, and a purchase by the flooding
    // user: standard types are counted by name however many own types a profile has.
    events.push(ev(
        json!({"event": "loyalty_signup", "partner_id": "shop-b", "user_id": "b-1"}),
    ));
    events.push(ev(
        json!({"event": "purchase", "partner_id": "shop-a", "user_id": "spammer-x", "cart_amount": "3"}),
    ));
    let mut speed = f.spawn_speed(&[
        "--flush-interval-secs",
        "0.5",
        "--profiles-dlq-topic",
        &profiles_dlq,
    ]);
    produce(&f.topic, &events).await;
    let docs = f.wait_for_events(events.len() as u64).await;
    terminate(&mut speed);
    let b = &docs["shop-b:b-1"];
    assert_eq!(b["event_counts"]["loyalty_signup"], json!(1));
    assert_eq!(b["event_types"], json!(["loyalty_signup"]));
    let spammer = &docs["shop-a:spammer-x"];
    assert_eq!(spammer["event_count"], json!(3_001));
    assert_eq!(spammer["event_counts"]["_other"], json!(3_000 - 100));
    assert_eq!(spammer["event_counts"]["purchase"], json!(1));
    // "Users who did X": the other partner's new type, a standard type after the flood, and
    // the flood's own first 100 types; the types counted under `_other` are not listed.
    let who_did = |event_type: &'static str| {
        let store = f.store.clone();
        async move {
            let query = json!({"query": {"term": {"event_types": event_type}}, "_source": ["profile_id", "partner_id", "user_id"]});
            let hits = store.search(query).await.unwrap();
            hits["hits"]["hits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h["_id"].as_str().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(who_did("loyalty_signup").await, vec!["shop-b:b-1"]);
    assert_eq!(who_did("purchase").await, vec!["shop-a:spammer-x"]);
    assert_eq!(who_did("bulk_50").await, vec!["shop-a:spammer-x"]);
    assert!(who_did("bulk_2999").await.is_empty());
    // The mapping did not grow: only the standard counters are fields.
    let mapping: Value = reqwest::get(format!("{}/{}/_mapping", es_url(), f.alias))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let index = mapping.as_object().unwrap().values().next().unwrap();
    let counters = index["mappings"]["properties"]["event_counts"]["properties"]
        .as_object()
        .unwrap();
    assert_eq!(
        counters.len(),
        pulse_core::names::STANDARD_EVENT_TYPES.len() + 1,
        "{counters:?}"
    );
    // Nothing was refused: read whatever arrives within 2 s.
    assert!(read_topic(&profiles_dlq, 0, Duration::from_secs(2)).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sums_beyond_the_range_are_dead_lettered_and_the_consumer_goes_on() {
    let f = Fixture::new("overflow", 2).await;
    // The largest amount ingest accepts, over and over, for one user: after 92,233 of them
    // the next would leave what a profile sums exactly (i64 hundredths).
    let whale: Vec<Event> = (0..92_240)
        .map(|i| {
            ev(
                json!({"event": "purchase", "partner_id": "shop-a", "user_id": "whale",
                "cart_amount": "1000000000000", "message_id": format!("w-{i}")}),
            )
        })
        .collect();
    let others = generate(2_000, 51, 100, 2);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut speed = f.spawn_speed(&["--flush-interval-secs", "0.5", "--metrics-listen", &listen]);
    produce(&f.topic, &whale).await;
    produce(&f.topic, &others).await;
    let dead = read_topic(&f.dlq, 7, Duration::from_secs(1));
    let docs = f.wait_for_events(92_233 + others.len() as u64).await;
    assert_eq!(wait_ready(port).await, Some(200), "still ready");
    assert!(speed.try_wait().unwrap().is_none(), "still running");
    terminate(&mut speed);
    assert_eq!(dead.len(), 7, "the seven purchases that would overflow");
    for r in &dead {
        let reason = r.header("pulse.error").unwrap();
        assert!(
            reason.starts_with("cart_amount: total_purchases") && reason.contains("range"),
            "{reason}"
        );
    }
    let w = &docs["shop-a:whale"];
    assert_eq!(w["total_purchases"], json!("92233000000000000"));
    assert_eq!(w["purchase_count"], json!(92_233));
    assert_eq!(
        w["total_purchases_minor"],
        json!(9_223_300_000_000_000_000_i64)
    );
    let truth = ground_truth(&others);
    let rest: HashMap<String, Value> = docs
        .into_iter()
        .filter(|(id, _)| id != "shop-a:whale")
        .collect();
    let problems = diff(&rest, &truth);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_ends_the_process_and_its_record_is_dead_lettered_on_the_restart() {
    let f = Fixture::new("panic", 2).await;
    let good = generate(600, 61, 60, 2);
    let mut poison = good[10].clone();
    poison.message_id = "poison-1".into();
    produce(&f.topic, &good[..300]).await;
    produce(&f.topic, std::slice::from_ref(&poison)).await;
    produce(&f.topic, &good[300..]).await;
    let failpoint = ("PULSE_FAILPOINT_PANIC_MESSAGE_ID", "poison-1");

    let mut speed = f.spawn_speed_env(&["--flush-interval-secs", "0.5"], &[failpoint]);
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = speed.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the panic did not end the process"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "a panic exits non-zero: {status:?}");

    // The restart (still with the failpoint armed) dead-letters the record instead of
    // folding it again, and folds everything else.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut speed = f.spawn_speed_env(
        &["--flush-interval-secs", "0.5", "--metrics-listen", &listen],
        &[failpoint],
    );
    let docs = f.wait_for_events(good.len() as u64).await;
    let dead = read_topic(&f.dlq, 1, Duration::from_secs(1));
    assert_eq!(wait_ready(port).await, Some(200));
    assert!(
        speed.try_wait().unwrap().is_none(),
        "the restart keeps running"
    );
    let journal = std::path::Path::new(&f.state_dir()).to_path_buf();
    terminate(&mut speed);
    let problems = diff(&docs, &ground_truth(&good));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].json()["message_id"], json!("poison-1"));
    let reason = dead[0].header("pulse.error").unwrap();
    assert!(
        reason.contains("made pulse-speed panic") && reason.contains("failpoint"),
        "{reason}"
    );
    // Committed past it: the journal is empty again.
    let left: Vec<_> = std::fs::read_dir(&journal)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_elasticsearch_refuses_go_to_the_profiles_dead_letter_topic() {
    let f = Fixture::new("refused", 2).await;
    let profiles_dlq = create_topic("sp-refused-pdlq", 1).await;
    // An index whose mapping disagrees with the documents (country as a number), as after a
    // bad manual change: every document with a country is refused for good.
    recreate_index(&f, json!({"properties": {"country": {"type": "long"}}})).await;
    let events = vec![
        ev(json!({"event": "page_view", "partner_id": "shop-a", "user_id": "no-country"})),
        ev(json!({"event": "page_view", "partner_id": "shop-a", "user_id": "tr", "country": "TR"})),
    ];
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut speed = f.spawn_speed(&[
        "--flush-interval-secs",
        "0.5",
        "--profiles-dlq-topic",
        &profiles_dlq,
        "--metrics-listen",
        &listen,
    ]);
    produce(&f.topic, &events).await;
    let dead = read_topic(&profiles_dlq, 1, Duration::from_secs(1));
    let docs = f.wait_for_events(1).await;
    assert_eq!(
        wait_ready(port).await,
        Some(200),
        "a refused document is not an outage"
    );
    let metrics = reqwest::get(format!("http://{listen}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    terminate(&mut speed);
    assert!(docs.contains_key("shop-a:no-country"));
    assert!(!docs.contains_key("shop-a:tr"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].key, "shop-a:tr");
    assert_eq!(
        dead[0].json()["user_id"],
        json!("tr"),
        "the whole document is kept"
    );
    let reason = dead[0].header("pulse.error").unwrap();
    assert!(reason.contains("country"), "{reason}");
    // The source is the event that last changed the document: its offset is the version.
    assert_eq!(dead[0].header("pulse.source.topic"), Some(f.topic.as_str()));
    assert!(dead[0].header("pulse.source.offset").is_some());
    assert_eq!(dead[0].header("pulse.index"), Some(f.alias.as_str()));
    assert!(
        metrics.contains("pulse_speed_docs_rejected_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_portal_queries_on_epoch_seconds_give_the_right_answer() {
    let f = Fixture::new("range", 2).await;
    let now = chrono::Utc::now().timestamp();
    let at = |user: &str, ago_secs: i64| {
        ev(
            json!({"event": "purchase", "partner_id": "bazaar", "user_id": user,
            "cart_amount": "10", "timestamp": now - ago_secs}),
        )
    };
    let events = vec![at("old", 10 * 86_400), at("recent", 3_600), at("fresh", 60)];
    let mut speed = f.spawn_speed(&["--flush-interval-secs", "0.5"]);
    produce(&f.topic, &events).await;
    f.wait_for_events(3).await;
    terminate(&mut speed);
    let users = |body: Value| -> Vec<String> {
        let mut u: Vec<String> = body["hits"]["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["_source"]["user_id"].as_str().unwrap().to_string())
            .collect();
        u.sort();
        u
    };
    let since = |secs: i64| {
        json!({"query": {"bool": {"filter": [{"term": {"partner_id": "bazaar"}},
            {"range": {"last_visit": {"gte": now - secs}}}]}}})
    };
    let recent = f.store.search(since(2 * 86_400)).await.unwrap();
    assert_eq!(users(recent), vec!["fresh", "recent"]);
    let last_hour = f.store.search(since(600)).await.unwrap();
    assert_eq!(users(last_hour), vec!["fresh"]);
    let first_seen = f
        .store
        .search(json!({"query": {"range": {"first_seen": {"lt": now - 86_400}}}}))
        .await
        .unwrap();
    assert_eq!(users(first_seen), vec!["old"]);
    // The README's top-buyers example.
    let top = f
        .store
        .search(json!({"query": {"term": {"partner_id": "bazaar"}},
            "sort": [{"total_purchases": "desc"}], "size": 3}))
        .await
        .unwrap();
    assert_eq!(top["hits"]["hits"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_upgrades_an_index_of_the_older_layout_and_says_what_it_cannot() {
    let f = Fixture::new("upgrade", 1).await;
    // The layout `setup` wrote before: event counts mapped dynamically, dates as `date`.
    let index = format!("{}-v1", f.alias);
    recreate_index(
        &f,
        json!({"dynamic": false, "properties": {
            "partner_id": {"type": "keyword"},
            "last_visit": {"type": "date", "format": "epoch_second"},
            "first_seen": {"type": "date", "format": "epoch_second"},
            "event_counts": {"type": "object", "dynamic": true}},
            "dynamic_templates": [{"counts": {"path_match": "event_counts.*", "mapping": {"type": "long"}}}]}),
    )
    .await;
    let lines = f.store.setup(1, 0).await.unwrap();
    assert!(
        lines.iter().any(|l| l.contains("brought up to date")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("warning:") && l.contains("last_visit") && l.contains("-v2")),
        "{lines:?}"
    );
    let mapping: Value = reqwest::get(format!("{}/{index}/_mapping", es_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let props = &mapping[&index]["mappings"]["properties"];
    assert_eq!(props["event_types"]["type"], json!("keyword"));
    assert_eq!(props["event_counts"]["dynamic"], json!("false"));
    assert_eq!(props["dedupe"]["enabled"], json!(false));
    // Idempotent: a second run changes nothing and says the same.
    assert_eq!(f.store.setup(1, 0).await.unwrap(), lines);
}

/// Two records another producer could write, each correctly keyed and canonical: one on
/// another partition than its key's (murmur2), one received "in 2200". The first, folded,
/// would give its user a watermark of the wrong partition, and every later event of the user
/// a 409 and a re-read for ever; the second would expire every message id the profile
/// remembers, so that a client retry after it counted twice. Both go to `events.dlq` with the
/// reason; the profile is exact, and no document was ever stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_on_the_wrong_partition_or_received_out_of_range_is_dead_lettered() {
    use pulse_core::partitioner::partition_of;
    let f = Fixture::new("placement", 2).await;
    let user = "u-placed";
    let key = format!("shop-a:{user}");
    let right = partition_of(key.as_bytes(), 2);
    let wrong = 1 - right;
    let event = |i: usize| {
        ev(
            json!({"event": "purchase", "partner_id": "shop-a", "user_id": user,
                  "cart_amount": "1.25", "message_id": format!("m{i}")}),
        )
    };
    // Other users on the wrong partition, so that its offsets run far ahead of the right one's.
    let fillers: Vec<Event> = (0..)
        .map(|i| {
            ev(json!({"event": "page_view", "partner_id": "shop-a", "user_id": format!("f{i}")}))
        })
        .filter(|e| partition_of(e.partition_key().as_bytes(), 2) == wrong)
        .take(300)
        .collect();
    produce(&f.topic, &fillers).await;
    let first: Vec<Event> = (0..5).map(event).collect();
    produce(&f.topic, &first).await;
    produce_to_partition(&f.topic, wrong, &key, &event(100).to_canonical_json()).await;
    let mut future = event(101);
    future.received_at = "2200-01-01T00:00:00Z".parse().unwrap();
    produce_raw(
        &f.topic,
        &[(Some(key.as_str()), &future.to_canonical_json())],
    )
    .await;
    // Later events of the user, on its own partition, at offsets far below the misplaced one's,
    // and a client retry of the first one.
    let later: Vec<Event> = (5..10).map(event).chain([event(0)]).collect();
    produce(&f.topic, &later).await;

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut speed = f.spawn_speed(&["--flush-interval-secs", "0.5", "--metrics-listen", &listen]);
    let dead = read_topic(&f.dlq, 2, Duration::from_secs(1));
    let docs = f.wait_for_events((fillers.len() + 10) as u64).await;
    // Some flushes after the last event: a stale document would be met by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, metrics) = poll_until(port, "/metrics", |s, _| s == 200).await;
    terminate(&mut speed);

    // The retry is not in the truth: it counts once.
    let good: Vec<Event> = fillers
        .iter()
        .cloned()
        .chain(first)
        .chain(later[..5].iter().cloned())
        .collect();
    let problems = diff(&docs, &ground_truth(&good));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let doc = &docs[&key];
    assert_eq!(
        doc["purchase_count"], 10,
        "ten purchases, the retry once: {doc}"
    );
    assert_eq!(doc["watermark"]["partition"], right);
    assert_eq!(
        counter(&metrics, "pulse_speed_docs_stale_total"),
        0.0,
        "no 409"
    );
    assert_eq!(dead.len(), 2, "both dead-lettered, once each");
    let reasons: Vec<&str> = dead
        .iter()
        .filter_map(|r| r.header("pulse.error"))
        .collect();
    let want = format!(
        "record on partition {wrong} but its key \"{key}\" belongs on partition {right} of 2"
    );
    assert!(reasons.iter().any(|r| r.contains(&want)), "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("received_at: 2200-01-01") && r.contains("outside 2000..2100")),
        "{reasons:?}"
    );
}
