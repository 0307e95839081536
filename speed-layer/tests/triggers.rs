//! Triggers end to end: speed layer → `triggers` topic → notifier → a local webhook receiver.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::*;
use pulse_speed::triggers::TriggerMessage;
use rust_decimal::Decimal;
use serde_json::Value;

const RULES: &str = r#"
[[rule]]
id = "cart-push"
partner = "*"
event = "add_to_cart"
template = "cart_reminder"
when = [
  { field = "cart_amount", op = "gte", value = "100" },
  { field = "country", op = "in", values = ["TR", "GB"] },
]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_qualifying_event_is_pushed_once_even_when_re_read() {
    let f = Fixture::new("trg", 4).await;
    let rules = std::env::temp_dir().join(format!("{}.toml", f.alias));
    std::fs::write(&rules, RULES).unwrap();
    let events = generate(4_000, 21, 400, 2);
    let hundred = Decimal::from(100);
    let rule_set = pulse_speed::triggers::RuleSet::from_toml(RULES).unwrap();
    let expected: Vec<String> = events
        .iter()
        .filter(|e| e.event == "add_to_cart")
        .filter(|e| e.cart_amount.is_some_and(|a| a >= hundred))
        .filter(|e| matches!(e.country.as_deref(), Some("TR" | "GB")))
        .map(|e| rule_set.rules[0].idempotency_key(e))
        .collect();
    assert!(
        expected.len() > 20,
        "the stream has qualifying events ({})",
        expected.len()
    );

    let (url, received) = webhook(StatusCode::OK).await;
    // The generated events are spread over two days: no age limit, so that every one of
    // them counts (the age limit has its own test).
    let mut notifier = f.spawn_notifier(
        &url,
        &["--rate-limit-secs", "0", "--max-trigger-age-secs", "0"],
    );
    // No flush during the test: nothing is committed, so a restart re-reads everything.
    let speed_args = [
        "--rules-file",
        rules.to_str().unwrap(),
        "--flush-interval-secs",
        "3600",
    ];
    let mut speed = f.spawn_speed(&speed_args);
    let produced_at = Instant::now();
    produce(&f.topic, &events).await;
    wait_until(|| received.keys().len() >= expected.len()).await;

    // Latency from produce to webhook, for the record (not a pass/fail bound).
    let mut latencies: Vec<u128> = received
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|(_, _, at)| at.duration_since(produced_at).as_millis())
        .collect();
    latencies.sort();
    eprintln!(
        "trigger latency from produce start: p50 {} ms, max {} ms ({} pushes)",
        latencies
            .get(latencies.len() / 2)
            .copied()
            .unwrap_or_default(),
        latencies.last().copied().unwrap_or_default(),
        latencies.len()
    );

    // Crash before any flush: the restarted layer re-reads every event and fires every
    // trigger again, with the same idempotency keys.
    speed.kill().unwrap();
    let _ = speed.wait();
    let mut speed = f.spawn_speed(&speed_args);
    let refired = read_topic(&f.triggers, expected.len() * 2, Duration::ZERO);
    assert_eq!(
        refired.len(),
        expected.len() * 2,
        "each trigger was fired twice"
    );
    // Give the notifier time to see the second round (it consumes as they come).
    tokio::time::sleep(Duration::from_secs(3)).await;
    speed.kill().unwrap();
    let _ = speed.wait();
    terminate(&mut notifier);

    let mut keys = received.keys();
    let total = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(total, keys.len(), "no trigger was pushed twice");
    let mut want = expected.clone();
    want.sort();
    assert_eq!(keys, want, "exactly the qualifying events were pushed");

    // The body is FCM-shaped and the key travels in data and header alike.
    let calls = received.calls.lock().unwrap();
    let (key, body, _) = &calls[0];
    assert_eq!(
        body["message"]["data"]["idempotency_key"],
        Value::String(key.clone())
    );
    assert_eq!(body["message"]["notification"]["title"], "cart_reminder");
}

fn trigger(key: &str, user: &str) -> TriggerMessage {
    TriggerMessage {
        idempotency_key: key.into(),
        rule_id: "r".into(),
        action: "push".into(),
        template: "t".into(),
        partner_id: "shop".into(),
        user_id: user.into(),
        event: "add_to_cart".into(),
        message_id: key.into(),
        event_timestamp: chrono::Utc::now().timestamp_millis(),
        fired_at: chrono::Utc::now().timestamp_millis(),
        received_at: chrono::Utc::now().timestamp_millis(),
        cart_amount: Some("120.00".into()),
        product_id: None,
        category: vec![],
    }
}

async fn produce_triggers(topic: &str, triggers: &[TriggerMessage]) {
    let records: Vec<(String, Vec<u8>)> = triggers
        .iter()
        .map(|t| (t.key(), serde_json::to_vec(t).unwrap()))
        .collect();
    let raw: Vec<(Option<&str>, &[u8])> = records
        .iter()
        .map(|(k, p)| (Some(k.as_str()), p.as_slice()))
        .collect();
    produce_raw(topic, &raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_push_per_user_per_window_and_duplicates_dropped() {
    let f = Fixture::new("rate", 1).await;
    let (url, received) = webhook(StatusCode::OK).await;
    produce_triggers(
        &f.triggers,
        &[
            trigger("x-1", "x"),
            trigger("x-2", "x"),
            trigger("x-3", "x"),
            trigger("y-1", "y"),
            trigger("y-1", "y"),
            trigger("z-1", "z"),
        ],
    )
    .await;
    let mut notifier = f.spawn_notifier(&url, &["--rate-limit-secs", "600"]);
    wait_until(|| received.keys().len() >= 3).await;
    // Let it work through the rest of the topic, which must not produce more pushes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    terminate(&mut notifier);
    let mut keys = received.keys();
    keys.sort();
    assert_eq!(keys, vec!["x-1", "y-1", "z-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_webhook_is_retried_then_dead_lettered() {
    let f = Fixture::new("fail", 1).await;
    let (url, received) = webhook(StatusCode::SERVICE_UNAVAILABLE).await;
    produce_triggers(&f.triggers, &[trigger("boom-1", "u")]).await;
    let mut notifier = f.spawn_notifier(
        &url,
        &[
            "--max-attempts",
            "3",
            "--backoff-ms",
            "50",
            "--rate-limit-secs",
            "0",
        ],
    );
    let dead = read_topic(&f.triggers_dlq, 1, Duration::ZERO);
    terminate(&mut notifier);
    let attempts: HashMap<String, usize> =
        received
            .keys()
            .into_iter()
            .fold(HashMap::new(), |mut m, k| {
                *m.entry(k).or_default() += 1;
                m
            });
    assert_eq!(
        attempts.get("boom-1"),
        Some(&3),
        "three attempts, then give up"
    );
    assert_eq!(dead.len(), 1, "the trigger is in the dead-letter topic");
    let reason = dead[0].header("pulse.error").unwrap();
    assert!(reason.contains("503"), "{reason}");
    let stored: TriggerMessage = serde_json::from_slice(&dead[0].payload).unwrap();
    assert_eq!(stored.idempotency_key, "boom-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_notifier_remembers_what_it_pushed_and_when() {
    let f = Fixture::new("ntf-restart", 2).await;
    let (url, received) = webhook(StatusCode::OK).await;
    let group = unique("notifier");
    // The restart gets the killed member's partitions after this, not after 45 s.
    let args = [
        "--rate-limit-secs",
        "600",
        "--kafka-opt",
        "session.timeout.ms=6000",
    ];
    let mut first = f.spawn_notifier_in(&group, &url, &args);
    produce_triggers(&f.triggers, &[trigger("a-1", "a")]).await;
    wait_until(|| !received.keys().is_empty()).await;
    assert_eq!(received.keys(), ["a-1"]);
    // Killed once the push is recorded: a kill between the delivery and the record is the
    // one duplicate a crash may cause (the trigger is not committed yet), not what this tests.
    let state = read_topic(&format!("{}.state", f.triggers), 1, Duration::ZERO);
    assert_eq!(state.len(), 1, "the push is recorded in the state topic");
    first.kill().unwrap();
    let _ = first.wait();

    // The same trigger again (a re-read upstream), another push for the same user inside the
    // window, and one for another user: only the last is pushed.
    let mut second = f.spawn_notifier_in(&group, &url, &args);
    produce_triggers(
        &f.triggers,
        &[
            trigger("a-1", "a"),
            trigger("a-2", "a"),
            trigger("b-1", "b"),
        ],
    )
    .await;
    wait_until(|| received.keys().contains(&"b-1".to_string())).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    terminate(&mut second);
    let mut keys = received.keys();
    keys.sort();
    assert_eq!(
        keys,
        ["a-1", "b-1"],
        "no duplicate and no second push inside the window"
    );
}

/// A dead-letter topic that refuses the notifier's writes (too small a `max.message.bytes`):
/// the trigger waits uncommitted, `/readyz` says why and the failures are counted; once the
/// operator fixes the topic the dead letter is written and the notifier is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_that_refuses_writes_makes_the_notifier_unready_and_loses_nothing() {
    let f = Fixture::new("ntf-refuse", 1).await;
    let (url, _received) = webhook(StatusCode::SERVICE_UNAVAILABLE).await;
    set_topic_config(&f.triggers_dlq, "max.message.bytes", "64").await;
    produce_triggers(&f.triggers, &[trigger("refused-1", "u")]).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "--max-attempts",
        "2",
        "--backoff-ms",
        "50",
        "--rate-limit-secs",
        "0",
        "--metrics-listen",
        &listen,
    ];
    let mut notifier = f.spawn_notifier(&url, &args);
    let (status, reason) = poll_until(port, "/readyz", |_, body| body.contains("refuses")).await;
    assert_eq!(status, 503, "{reason}");
    let (_, metrics) = poll_until(port, "/metrics", |_, body| {
        counter(body, "pulse_notifier_kafka_failures_total") >= 2.0
    })
    .await;
    assert!(metrics.contains("pulse_notifier_kafka_failures_total"));

    set_topic_config(&f.triggers_dlq, "max.message.bytes", "1048588").await;
    let dead = read_topic(&f.triggers_dlq, 1, Duration::ZERO);
    assert_eq!(
        dead.len(),
        1,
        "the trigger is dead-lettered once the topic takes it"
    );
    let stored: TriggerMessage = serde_json::from_slice(&dead[0].payload).unwrap();
    assert_eq!(stored.idempotency_key, "refused-1");
    let (status, _) = poll_until(port, "/readyz", |s, _| s == 200).await;
    assert_eq!(status, 200);
    terminate(&mut notifier);
}

/// Two partners share the deployment, each with its own rule and its own webhook, and a rule
/// of the whole deployment (`partner = "*"`): each webhook gets exactly its partner's pushes,
/// a partner's rule never fires on the other's events, and a partner with no webhook gets
/// its trigger dead-lettered, not sent to someone else's endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_partners_pushes_go_to_its_own_webhook_and_no_other() {
    const PARTNER_RULES: &str = r#"
[[rule]]
id = "a-cart"
partner = "shop-a"
event = "add_to_cart"
template = "cart_a"

[[rule]]
id = "b-big-cart"
partner = "shop-b"
event = "add_to_cart"
template = "cart_b"
when = [{ field = "cart_amount", op = "gte", value = "100" }]

[[rule]]
id = "any-purchase"
partner = "*"
event = "purchase"
template = "thanks"
"#;
    let f = Fixture::new("trg-partners", 4).await;
    let rules_path = std::env::temp_dir().join(format!("{}.toml", f.alias));
    std::fs::write(&rules_path, PARTNER_RULES).unwrap();
    let rules = pulse_speed::triggers::RuleSet::from_toml(PARTNER_RULES).unwrap();
    let mut events = generate(3_000, 23, 300, 1);
    // A third partner, with a purchase (the "*" rule fires) but no webhook.
    let stranger = pulse_core::parse_event(
        r#"{"event":"purchase","partner_id":"shop-c","user_id":"c1","cart_amount":"5","message_id":"c-order-1"}"#,
        &pulse_core::ParseContext::now(),
    )
    .unwrap();
    events.push(stranger);
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for e in &events {
        for rule in rules.matching(e) {
            expected
                .entry(e.partner_id.clone())
                .or_default()
                .push(rule.idempotency_key(e));
        }
    }
    for partner in ["shop-a", "shop-b"] {
        assert!(
            expected.get(partner).is_some_and(|k| k.len() > 10),
            "{partner}: {expected:?}"
        );
    }
    // Partner b's rule is stricter: some of b's carts must not fire, as a's rule would.
    let b_carts = events
        .iter()
        .filter(|e| e.partner_id == "shop-b" && e.event == "add_to_cart")
        .count();
    let b_cart_pushes = expected["shop-b"]
        .iter()
        .filter(|k| k.starts_with("b-big-cart:"))
        .count();
    assert!(b_cart_pushes < b_carts, "{b_cart_pushes} of {b_carts}");

    let (url_a, got_a) = webhook(StatusCode::OK).await;
    let (url_b, got_b) = webhook(StatusCode::OK).await;
    let routes = std::env::temp_dir().join(format!("{}-webhooks.json", f.alias));
    std::fs::write(
        &routes,
        serde_json::json!({"shop-a": url_a, "shop-b": url_b}).to_string(),
    )
    .unwrap();
    let mut notifier = f.spawn_notifier(
        "",
        &[
            "--webhooks-file",
            routes.to_str().unwrap(),
            "--rate-limit-secs",
            "0",
            "--max-trigger-age-secs",
            "0",
        ],
    );
    let mut speed = f.spawn_speed(&["--rules-file", rules_path.to_str().unwrap()]);
    produce(&f.topic, &events).await;
    let want_a = expected["shop-a"].len();
    let want_b = expected["shop-b"].len();
    wait_until(|| got_a.keys().len() >= want_a && got_b.keys().len() >= want_b).await;
    let dead = read_topic(&f.triggers_dlq, 1, Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(2)).await;
    terminate(&mut speed);
    terminate(&mut notifier);

    for (partner, got) in [("shop-a", &got_a), ("shop-b", &got_b)] {
        let mut keys = got.keys();
        keys.sort();
        let mut want = expected[partner].clone();
        want.sort();
        assert_eq!(
            keys, want,
            "{partner}'s webhook got exactly {partner}'s pushes"
        );
        for (_, body, _) in got.calls.lock().unwrap().iter() {
            assert_eq!(body["message"]["data"]["partner_id"], partner, "{body}");
        }
    }
    assert_eq!(dead.len(), 1, "shop-c's trigger dead-lettered");
    let reason = dead[0].header("pulse.error").unwrap_or_default();
    assert!(
        reason.contains("no webhook for partner \"shop-c\""),
        "{reason}"
    );
    assert_eq!(dead[0].json()["partner_id"], "shop-c");
}
