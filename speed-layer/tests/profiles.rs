//! The speed layer against real Kafka and real Elasticsearch: profiles equal a ground truth
//! computed independently from the generated events, also across SIGKILLs, a rebalance
//! between two replicas and an Elasticsearch outage; bad records go to the dead-letter topic.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use pulse_service::keys::{KeyKind, PartnerKeys, WriteKeys};
use pulse_speed::api::{router, ApiState};
use pulse_tests::proxy::CutProxy;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_equal_ground_truth_and_the_api_answers_from_them() {
    let f = Fixture::new("truth", 8).await;
    let events = generate(6_000, 11, 300, 20);
    let truth = ground_truth(&events);
    produce(&f.topic, &events).await;
    let mut speed = f.spawn_speed(&["--flush-interval-secs", "1"]);
    let docs = f.wait_for_events(events.len() as u64).await;
    terminate(&mut speed);
    let problems = diff(&docs, &truth);
    assert!(
        problems.is_empty(),
        "profiles differ from the ground truth:\n{}",
        problems.join("\n")
    );
    // The three models do not all agree (timestamps span 20 days), so each is really checked.
    assert!(truth
        .values()
        .any(|t| t.top_gender() != t.top_gender_window(chrono::Utc::now(), 7)));
    assert!(truth.values().any(|t| t.top_gender() != t.last_gender));

    // The gender API, over HTTP, from the stored model state.
    // Reads need the partner's secret read key ("ra"); its public write key ("ka") is refused.
    let write_keys = WriteKeys::load(None, &["ka=shop-a".into()]).unwrap();
    let read_keys = PartnerKeys::load_kind(KeyKind::Read, None, &["ra=shop-a".into()]).unwrap();
    let api = ApiState::new(f.store.clone(), read_keys, Some(write_keys)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(Arc::new(api))).await });
    let client = reqwest::Client::new();
    let get = |path: String, key: Option<&'static str>| {
        let mut req = client.get(format!("{url}{path}"));
        if let Some(k) = key {
            req = req.basic_auth(k, Some(""));
        }
        async move {
            let resp = req.send().await.unwrap();
            (
                resp.status().as_u16(),
                resp.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let mut checked = 0;
    for (id, t) in truth
        .iter()
        .filter(|(id, _)| id.starts_with("shop-a:"))
        .take(25)
    {
        let cid = id.trim_start_matches("shop-a:");
        for (model, want) in [
            ("MODEL1", t.last_gender.clone()),
            ("MODEL2", t.top_gender()),
            ("MODEL3", t.top_gender_window(chrono::Utc::now(), 7)),
        ] {
            let (status, body) =
                get(format!("/api/v1/getGender/{cid}?model={model}"), Some("ra")).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                body,
                json!({"cid": cid, "model": model, "gender": want}),
                "{id} {model}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 30);
    assert_eq!(
        get("/api/v1/getGender/nobody?model=MODEL1".into(), Some("ra"))
            .await
            .0,
        404
    );
    assert_eq!(
        get("/api/v1/getGender/u1?model=MODEL9".into(), Some("ra"))
            .await
            .0,
        400
    );
    assert_eq!(
        get("/api/v1/getGender/u1?model=MODEL1".into(), None)
            .await
            .0,
        401
    );
    assert_eq!(
        get("/api/v1/getGender/u1?model=MODEL1".into(), Some("nope"))
            .await
            .0,
        401
    );
    // The public write key reads nothing, on every read endpoint, whatever the user.
    let some_user = truth
        .keys()
        .find(|id| id.starts_with("shop-a:"))
        .unwrap()
        .trim_start_matches("shop-a:")
        .to_string();
    for path in [
        format!("/api/v1/getGender/{some_user}?model=MODEL1"),
        format!("/api/v1/profiles/{some_user}"),
    ] {
        let (status, body) = get(path.clone(), Some("ka")).await;
        assert_eq!(status, 403, "{path}: {body}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains("write key") && msg.contains("read key"),
            "{msg}"
        );
        assert!(body.get("user_id").is_none() && body.get("gender").is_none());
    }
    let (status, body) = get(format!("/api/v1/profiles/{some_user}"), Some("ra")).await;
    assert_eq!(status, 200);
    assert_eq!(body["user_id"], json!(some_user));
    // A key sees only its own partner's users: a user id both partners have answers with
    // shop-a's profile (ids are `u<n>` for both, so such ids exist: asserted, not assumed), and
    // one only shop-b has is not found.
    let shared: Vec<&str> = truth
        .keys()
        .filter_map(|id| id.strip_prefix("shop-b:"))
        .filter(|cid| truth.contains_key(&format!("shop-a:{cid}")))
        .collect();
    assert!(shared.len() >= 5, "user ids both partners use: {shared:?}");
    for cid in shared.iter().take(5) {
        let (status, body) = get(format!("/api/v1/profiles/{cid}"), Some("ra")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["partner_id"], "shop-a", "{body}");
        let mine = &truth[&format!("shop-a:{cid}")];
        assert_eq!(
            body["event_count"], mine.event_count,
            "shop-a's own count: {body}"
        );
    }
    let b_only = truth
        .keys()
        .filter_map(|id| id.strip_prefix("shop-b:"))
        .find(|cid| !truth.contains_key(&format!("shop-a:{cid}")));
    if let Some(cid) = b_only {
        assert_eq!(
            get(format!("/api/v1/getGender/{cid}"), Some("ra")).await.0,
            404
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_any_moment_keeps_profiles_exact() {
    let f = Fixture::new("crash", 8).await;
    let events = generate(24_000, 12, 2_000, 10);
    let truth = ground_truth(&events);
    let chunks: Vec<&[pulse_core::Event]> = events.chunks(6_000).collect();
    // Frequent small flushes, so kills land before, during and after flushes.
    let args = ["--flush-interval-secs", "0.2", "--bulk-docs", "200"];
    let mut speed = f.spawn_speed(&args);
    let mut partial_states = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        produce(&f.topic, chunk).await;
        tokio::time::sleep(Duration::from_millis(400 + 150 * i as u64)).await;
        speed.kill().expect("SIGKILL");
        let _ = speed.wait();
        let docs = f.documents().await;
        partial_states.push(
            docs.values()
                .map(|d| d["event_count"].as_u64().unwrap_or(0))
                .sum::<u64>(),
        );
        speed = f.spawn_speed(&args);
    }
    let docs = f.wait_for_events(events.len() as u64).await;
    terminate(&mut speed);
    let problems = diff(&docs, &truth);
    assert!(
        problems.is_empty(),
        "after 4 SIGKILLs profiles differ from the ground truth:\n{}",
        problems.join("\n")
    );
    // Not vacuous: at least one kill caught the layer with part of the stream flushed.
    assert!(
        partial_states
            .iter()
            .any(|&n| n > 0 && n < events.len() as u64),
        "kills all landed before or after everything: {partial_states:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_between_two_replicas_keeps_profiles_exact() {
    let f = Fixture::new("rebalance", 12).await;
    let events = generate(18_000, 13, 1_500, 10);
    let truth = ground_truth(&events);
    let chunks: Vec<&[pulse_core::Event]> = events.chunks(6_000).collect();
    // A short session timeout so the survivor takes over a killed replica's partitions quickly.
    let args = [
        "--flush-interval-secs",
        "0.5",
        "--kafka-opt",
        "session.timeout.ms=6000",
    ];
    produce(&f.topic, chunks[0]).await;
    let mut a = f.spawn_speed(&args);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut b = f.spawn_speed(&args); // rebalance: a gives partitions to b
    produce(&f.topic, chunks[1]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.kill().expect("SIGKILL a"); // b takes over a's partitions after the session timeout
    let _ = a.wait();
    produce(&f.topic, chunks[2]).await;
    let docs = f.wait_for_events(events.len() as u64).await;
    terminate(&mut b);
    let problems = diff(&docs, &truth);
    assert!(
        problems.is_empty(),
        "after a rebalance and a kill profiles differ:\n{}",
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_outage_backs_off_then_catches_up_with_no_loss() {
    let f = Fixture::new("outage", 8).await;
    let events = generate(9_000, 14, 800, 10);
    let truth = ground_truth(&events);
    let (first, rest) = events.split_at(3_000);
    let es = CutProxy::start("127.0.0.1:0", es_url().trim_start_matches("http://")).await;
    let proxy = format!("http://{}", es.addr);
    produce(&f.topic, first).await;
    let mut speed = f.spawn_speed(&[
        "--flush-interval-secs",
        "0.5",
        "--es-url",
        &proxy,
        "--max-backoff-secs",
        "1",
    ]);
    let docs = f.wait_for_events(first.len() as u64).await;
    assert_eq!(
        docs.values()
            .map(|d| d["event_count"].as_u64().unwrap())
            .sum::<u64>(),
        first.len() as u64
    );

    es.cut();
    produce(&f.topic, rest).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = f.documents().await;
    let written: u64 = during
        .values()
        .map(|d| d["event_count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        written,
        first.len() as u64,
        "nothing was written while Elasticsearch was down"
    );
    assert!(
        speed.try_wait().unwrap().is_none(),
        "the speed layer stays up through the outage"
    );

    es.restore();
    let docs = f.wait_for_events(events.len() as u64).await;
    terminate(&mut speed);
    let problems = diff(&docs, &truth);
    assert!(
        problems.is_empty(),
        "after the outage profiles differ:\n{}",
        problems.join("\n")
    );
}

/// A SIGTERM while Elasticsearch is down ends the retries of loading profiles (the process
/// exits cleanly instead of waiting for the outage to end), and nothing is lost: the restart
/// reads what was not folded and flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_elasticsearch_outage_stops_the_speed_layer_and_loses_nothing() {
    let f = Fixture::new("outage-stop", 4).await;
    let events = generate(2_000, 16, 300, 3);
    let truth = ground_truth(&events);
    let es = CutProxy::start("127.0.0.1:0", es_url().trim_start_matches("http://")).await;
    let proxy = format!("http://{}", es.addr);
    es.cut();
    produce(&f.topic, &events).await;
    let mut speed = f.spawn_speed(&["--flush-interval-secs", "0.5", "--es-url", &proxy]);
    // Long enough to be inside the retries of loading the first profiles.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(speed.try_wait().unwrap().is_none(), "still retrying");
    let status = terminate_in_time(&mut speed).await;
    assert!(status.success(), "{status}");

    es.restore();
    let mut speed = f.spawn_speed(&["--flush-interval-secs", "0.5"]);
    let docs = f.wait_for_events(events.len() as u64).await;
    terminate(&mut speed);
    let problems = diff(&docs, &truth);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_go_to_the_dead_letter_topic_and_the_consumer_goes_on() {
    let f = Fixture::new("dlq", 4).await;
    let good = generate(500, 15, 50, 3);
    let truth = ground_truth(&good);
    let valid = good[0].to_canonical_json();
    let mut wrong_key = good[1].clone();
    wrong_key.message_id = "wrong-key".into();
    let wrong_key_json = wrong_key.to_canonical_json();
    let huge = vec![b'x'; 200_000];
    // JSON in the canonical shape that breaks a rule ingest enforces: consumers check the same.
    let canonical = |edit: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_slice(&good[2].to_canonical_json()).unwrap();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let no_user = canonical(&|v| {
        let o = v.as_object_mut().unwrap();
        o.remove("user_id");
        o.remove("anonymous_id");
    });
    let huge_amount = canonical(&|v| {
        v["event"] = json!("purchase");
        v["cart_amount"] = json!("79228162514264337593543950335");
    });
    let mut deep = json!(1);
    for _ in 0..60 {
        deep = json!({ "x": deep });
    }
    let too_deep = canonical(&|v| v["properties"] = deep.clone());
    let key2 = good[2].partition_key();
    let bad: Vec<(Option<&str>, &[u8])> = vec![
        (Some("shop-a:"), &no_user),
        (Some(&key2), &huge_amount),
        (Some(&key2), &too_deep),
        (Some("shop-a:u1"), b"not json at all"),
        (Some("shop-a:u1"), b"{\"event\": \"page_view\"}"),
        (
            Some("shop-a:u1"),
            b"{\"event\": 5, \"partner_id\": \"shop-a\"}",
        ),
        (Some("shop-a:u1"), b""),
        (None, &valid),
        (Some("shop-a:someone-else"), &wrong_key_json),
        (Some("shop-a:u1"), &huge),
    ];
    produce(&f.topic, &good[..250]).await;
    produce_raw(&f.topic, &bad).await;
    produce(&f.topic, &good[250..]).await;
    let mut speed = f.spawn_speed(&["--flush-interval-secs", "0.5"]);
    let docs = f.wait_for_events(good.len() as u64).await;
    let dead = read_topic(&f.dlq, bad.len(), Duration::from_secs(1));
    terminate(&mut speed);

    let problems = diff(&docs, &truth);
    assert!(
        problems.is_empty(),
        "good events around bad ones:\n{}",
        problems.join("\n")
    );
    assert_eq!(
        dead.len(),
        bad.len(),
        "every bad record is dead-lettered, once"
    );
    for r in &dead {
        let reason = r.header("pulse.error").expect("reason header");
        assert!(!reason.is_empty());
        assert_eq!(r.header("pulse.source.topic"), Some(f.topic.as_str()));
        assert!(r.header("pulse.source.offset").is_some());
    }
    let reasons: Vec<&str> = dead
        .iter()
        .filter_map(|r| r.header("pulse.error"))
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("not a canonical event")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("is not the event's key")),
        "{reasons:?}"
    );
    for want in [
        "invalid event: user_id: required field is missing",
        "invalid event: cart_amount: 79228162514264337593543950335 is out of range",
        "invalid event: properties: nested 60 levels deep",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "{want}: {reasons:?}"
        );
    }
    // Payloads are kept as they were, for inspection and replay.
    assert!(dead.iter().any(|r| r.payload == b"not json at all"));
}
