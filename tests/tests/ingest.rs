//! Ingest against the real Kafka broker: what is accepted is in the topic, with the right key,
//! partition and content; what is not is answered with a status and a message that says why.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use pulse_core::Event;
use pulse_tests::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(
    url: &str,
    path: &str,
    key: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let mut req = client()
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(key) = key {
        req = req.basic_auth(key, Some(""));
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

fn event(user: &str, i: usize) -> Value {
    json!({
        "event": if i.is_multiple_of(3) { "add_to_cart" } else { "product_view" },
        "partner_id": "partner-a",
        "user_id": user,
        "message_id": format!("m-{user}-{i}"),
        "timestamp": 1_795_255_200_000_i64 + i as i64,
        "cart_amount": format!("{}.{:02}", i, i % 100),
        "category": ["Kadın Giyim", "Elektronik"],
        "country": "tr",
    })
}

#[tokio::test]
async fn accepted_events_are_in_kafka_with_key_partition_and_content() {
    let topic = create_topic("it-events", 100).await;
    let ingest = RunningIngest::start(ingest_config(&topic)).await;

    // 10 users × 12 events, sent as one array, as NDJSON and gzip-compressed single events.
    let users: Vec<String> = (0..10).map(|u| format!("user-{u}")).collect();
    let mut sent: Vec<Value> = Vec::new();
    for (u, user) in users.iter().enumerate() {
        for i in 0..12 {
            let mut e = event(user, i);
            e["seq"] = json!(u * 100 + i);
            sent.push(e);
        }
    }
    let (array, rest) = sent.split_at(60);
    let (ndjson, gzip_single) = rest.split_at(50);

    let (status, body) = post(
        &ingest.url,
        "/v1/events",
        Some("key-a"),
        serde_json::to_vec(array).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], json!(60));
    let ids: Vec<&str> = body["message_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        array
            .iter()
            .map(|e| e["message_id"].as_str().unwrap())
            .collect::<Vec<_>>()
    );

    let lines: String = ndjson.iter().map(|e| format!("{e}\n")).collect();
    let resp = client()
        .post(format!("{}/v1/events", ingest.url))
        .basic_auth("key-a", Some(""))
        .header("content-type", "application/x-ndjson")
        .body(lines)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    for e in gzip_single {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(e.to_string().as_bytes()).unwrap();
        let resp = client()
            .post(format!("{}/v1/events", ingest.url))
            .header("authorization", "Bearer key-a")
            .header("content-encoding", "gzip")
            .body(enc.finish().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }

    let records = read_topic(&topic, sent.len(), Duration::from_secs(1));
    assert_eq!(
        records.len(),
        sent.len(),
        "every accepted event is in the topic, once"
    );

    // Key = partner:user; one user → one partition; offsets on it in send order.
    let by_key = partitions_by_key(&records);
    assert_eq!(by_key.len(), users.len());
    for user in &users {
        let parts = &by_key[&format!("partner-a:{user}")];
        assert_eq!(parts.len(), 1, "{user} spread over partitions {parts:?}");
    }
    let distinct: HashSet<i32> = records.iter().map(|r| r.partition).collect();
    assert!(distinct.len() > 1, "keys are spread over partitions");

    // Content: every sent event is there, normalised, with its message_id, exact amount, and
    // unknown fields (`seq`) kept under properties.
    for r in &records {
        let e = Event::from_canonical_json(&r.payload).expect("canonical event");
        let seq = e.properties.as_ref().unwrap()["seq"].as_u64().unwrap() as usize;
        let original = sent.iter().find(|s| s["seq"] == json!(seq)).unwrap();
        assert_eq!(e.message_id, original["message_id"].as_str().unwrap());
        assert_eq!(
            r.key,
            format!("partner-a:{}", original["user_id"].as_str().unwrap())
        );
        assert_eq!(
            e.cart_amount.unwrap().to_string(),
            original["cart_amount"].as_str().unwrap()
        );
        assert_eq!(e.country.as_deref(), Some("TR"));
        assert_eq!(e.category, vec!["Kadın Giyim", "Elektronik"]);
        assert_eq!(
            e.timestamp.timestamp_millis(),
            original["timestamp"].as_i64().unwrap()
        );
    }
    // Per-user order: within a user's partition, seq increases with the offset.
    for user in &users {
        let mut mine: Vec<_> = records
            .iter()
            .filter(|r| r.key.ends_with(&format!(":{user}")))
            .collect();
        mine.sort_by_key(|r| r.offset);
        let seqs: Vec<u64> = mine
            .iter()
            .map(|r| r.json()["properties"]["seq"].as_u64().unwrap())
            .collect();
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(seqs, sorted, "order of {user}");
    }
    ingest.stop().await.expect("graceful stop");
}

#[tokio::test]
async fn segment_endpoints_accept_segment_payloads() {
    let topic = create_topic("it-segment", 4).await;
    let ingest = RunningIngest::start(ingest_config(&topic)).await;

    // analytics-node style: write key as the Basic user.
    let track = json!({
        "type": "track", "event": "Product Added", "userId": "019mr8mf4r", "messageId": "seg-1",
        "timestamp": "2026-11-21T09:30:00.000Z",
        "properties": {"product_id": "507f1f77bcf86cd799439011", "sku": "G-32", "category": "Games",
            "name": "Monopoly: 3rd Edition", "brand": "Hasbro", "price": 18.99, "quantity": 1},
        "context": {"ip": "8.8.8.8", "locale": "en-GB", "userAgent": "Mozilla/5.0 (Macintosh)",
            "page": {"url": "https://shop/p/1", "referrer": "https://google.com"}},
    });
    let (status, body) = post(&ingest.url, "/v1/track", Some("key-b"), track.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"success": true}));

    let identify = json!({"userId": "019mr8mf4r", "messageId": "seg-2", "traits": {"gender": "female", "plan": "premium"}});
    assert_eq!(
        post(
            &ingest.url,
            "/v1/identify",
            Some("key-b"),
            identify.to_string()
        )
        .await
        .0,
        StatusCode::OK
    );
    let page = json!({"anonymousId": "anon-7", "messageId": "seg-3", "name": "Home", "properties": {"url": "https://shop/"}});
    assert_eq!(
        post(&ingest.url, "/v1/page", Some("key-b"), page.to_string())
            .await
            .0,
        StatusCode::OK
    );

    // analytics.js style batch: key in the body, no Authorization header.
    let batch = json!({
        "writeKey": "key-b",
        "batch": [
            {"type": "track", "event": "Order Completed", "userId": "019mr8mf4r", "messageId": "seg-4",
             "properties": {"order_id": "50314b8e", "total": 27.50, "revenue": 25.00, "currency": "USD"}},
            {"type": "page", "anonymousId": "anon-7", "messageId": "seg-5"}
        ]
    });
    let (status, body) = post(&ingest.url, "/v1/batch", None, batch.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let records = read_topic(&topic, 5, Duration::from_secs(1));
    assert_eq!(records.len(), 5);
    let by_id = |id: &str| -> Event {
        records
            .iter()
            .map(|r| Event::from_canonical_json(&r.payload).unwrap())
            .find(|e| e.message_id == id)
            .unwrap_or_else(|| panic!("{id} missing"))
    };
    let added = by_id("seg-1");
    assert_eq!(added.event, "add_to_cart");
    assert_eq!(added.partner_id, "partner-b");
    assert_eq!(added.cart_amount.unwrap().to_string(), "18.99");
    assert_eq!(
        added.product_id.as_deref(),
        Some("507f1f77bcf86cd799439011")
    );
    assert_eq!(
        (added.language.as_deref(), added.country.as_deref()),
        (Some("en"), Some("GB"))
    );
    assert_eq!(added.current_url.as_deref(), Some("https://shop/p/1"));
    assert_eq!(by_id("seg-2").gender.as_deref(), Some("female"));
    assert_eq!(by_id("seg-3").event, "page_view");
    let order = by_id("seg-4");
    assert_eq!(
        (order.event.as_str(), order.cart_amount.unwrap().to_string()),
        ("purchase", "27.5".into())
    );
    assert!(records.iter().all(|r| r.key.starts_with("partner-b:")));
    ingest.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_gets_status_and_message_and_writes_nothing() {
    let topic = create_topic("it-bad", 4).await;
    let mut config = ingest_config(&topic);
    config.max_body_bytes = 64 * 1024;
    config.max_batch_events = 10;
    let ingest = RunningIngest::start(config).await;
    let url = ingest.url.clone();
    let ok = |user: &str| json!({"event": "page_view", "partner_id": "partner-a", "user_id": user});

    struct Case {
        name: &'static str,
        key: Option<&'static str>,
        body: Vec<u8>,
        headers: Vec<(&'static str, &'static str)>,
        status: StatusCode,
        message: &'static str,
    }
    let case = |name, key, body: Vec<u8>, status, message| Case {
        name,
        key,
        body,
        headers: vec![],
        status,
        message,
    };
    let big_event = json!({"event": "x", "partner_id": "partner-a", "user_id": "u", "properties": {"b": "x".repeat(40_000)}});
    let amount = |a: &str| {
        format!(
            r#"{{"event":"purchase","partner_id":"partner-a","user_id":"u","cart_amount":{a}}}"#
        )
        .into_bytes()
    };
    let a_year_ahead = (chrono::Utc::now() + chrono::Duration::days(365)).to_rfc3339();
    let nested = |levels: usize| {
        let mut v = String::from("1");
        for _ in 0..levels {
            v = format!(r#"{{"x":{v}}}"#);
        }
        format!(r#"{{"event":"x","partner_id":"partner-a","user_id":"u","properties":{v}}}"#)
            .into_bytes()
    };
    let mut cases = vec![
        case("malformed", Some("key-a"), b"{\"event\": ".to_vec(), StatusCode::BAD_REQUEST, "malformed JSON"),
        case("malformed array", Some("key-a"), b"[{\"event\": 1},".to_vec(), StatusCode::BAD_REQUEST, "malformed JSON array"),
        case("not an object", Some("key-a"), b"42".to_vec(), StatusCode::BAD_REQUEST, "expected an object, got a number"),
        case("empty", Some("key-a"), b"  ".to_vec(), StatusCode::BAD_REQUEST, "request body is empty"),
        case("not utf-8", Some("key-a"), vec![0xff, 0xfe, b'{'], StatusCode::BAD_REQUEST, "not valid UTF-8"),
        case("missing event", Some("key-a"), json!({"partner_id": "partner-a", "user_id": "u"}).to_string().into(), StatusCode::BAD_REQUEST, "event: required field is missing"),
        case("missing user", Some("key-a"), json!({"event": "x", "partner_id": "partner-a"}).to_string().into(), StatusCode::BAD_REQUEST, "user_id: required field is missing"),
        case("wrong type", Some("key-a"), json!({"event": "purchase", "partner_id": "partner-a", "user_id": "u", "cart_amount": true}).to_string().into(), StatusCode::BAD_REQUEST, "cart_amount: expected a number or decimal string, got true"),
        case("wrong timestamp", Some("key-a"), json!({"event": "x", "partner_id": "partner-a", "user_id": "u", "timestamp": "yesterday"}).to_string().into(), StatusCode::BAD_REQUEST, "timestamp: expected an RFC 3339"),
        case("amount at Decimal::MAX", Some("key-a"), amount("\"79228162514264337593543950335\""), StatusCode::BAD_REQUEST, "cart_amount: 79228162514264337593543950335 is out of range; amounts must be within ±1000000000000"),
        case("amount 1e27", Some("key-a"), amount("1e27"), StatusCode::BAD_REQUEST, "cart_amount: 1e27 is out of range"),
        case("amount beyond any decimal", Some("key-a"), amount("1e40"), StatusCode::BAD_REQUEST, "cart_amount: 1e40 is out of range"),
        case("amount too precise", Some("key-a"), amount("\"0.0000000001\""), StatusCode::BAD_REQUEST, "cart_amount: 0.0000000001 has more than 9 decimal places"),
        case("a year ahead", Some("key-a"), json!({"event": "x", "partner_id": "partner-a", "user_id": "u", "timestamp": a_year_ahead}).to_string().into(), StatusCode::BAD_REQUEST, "s ahead of the time it was received"),
        case("120 levels deep", Some("key-a"), nested(120), StatusCode::BAD_REQUEST, "properties: nested 120 levels deep; at most 32 are accepted"),
        case("130 levels deep", Some("key-a"), nested(130), StatusCode::BAD_REQUEST, "recursion limit exceeded"),
        case("bad one in batch", Some("key-a"), json!([ok("u1"), ok("u2"), {"event": "x", "partner_id": "partner-a", "user_id": ["u"]}]).to_string().into(), StatusCode::BAD_REQUEST, "first: event 2: user_id: expected a string, got an array"),
        case("oversized event", Some("key-a"), big_event.to_string().into(), StatusCode::BAD_REQUEST, "the limit is 32768 bytes"),
        case("oversized body", Some("key-a"), json!([big_event, big_event]).to_string().into(), StatusCode::PAYLOAD_TOO_LARGE, "larger than 65536 bytes"),
        case("too many events", Some("key-a"), serde_json::to_vec(&(0..11).map(|i| ok(&i.to_string())).collect::<Vec<_>>()).unwrap(), StatusCode::PAYLOAD_TOO_LARGE, "batch has 11 events; the limit is 10"),
        case("no key", None, ok("u").to_string().into(), StatusCode::UNAUTHORIZED, "missing write key"),
        case("unknown key", Some("nope"), ok("u").to_string().into(), StatusCode::UNAUTHORIZED, "unknown write key"),
        case("other partner", Some("key-b"), ok("u").to_string().into(), StatusCode::FORBIDDEN, "partner_id: \"partner-a\" is not the partner of this write key"),
        case("segment batch shape", Some("key-a"), b"{\"events\": []}".to_vec(), StatusCode::BAD_REQUEST, "expected {\"batch\""),
    ];
    let mut gz_bad = case(
        "bad gzip",
        Some("key-a"),
        b"not gzip".to_vec(),
        StatusCode::BAD_REQUEST,
        "not valid gzip",
    );
    gz_bad.headers.push(("content-encoding", "gzip"));
    let mut br = case(
        "unsupported encoding",
        Some("key-a"),
        b"x".to_vec(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported Content-Encoding",
    );
    br.headers.push(("content-encoding", "br"));
    // A gzip bomb: 60 KiB on the wire, 10 MiB inflated.
    let mut bomb_body = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    bomb_body.write_all(&vec![b' '; 10 * 1024 * 1024]).unwrap();
    let mut bomb = case(
        "gzip bomb",
        Some("key-a"),
        bomb_body.finish().unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "larger than 65536 bytes",
    );
    bomb.headers.push(("content-encoding", "gzip"));
    cases.extend([gz_bad, br, bomb]);

    for c in cases {
        let path = if c.name == "segment batch shape" {
            "/v1/batch"
        } else {
            "/v1/events"
        };
        let mut req = client().post(format!("{url}{path}")).body(c.body);
        if let Some(key) = c.key {
            req = req.basic_auth(key, Some(""));
        }
        for (k, v) in c.headers {
            req = req.header(k, v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status, c.status, "{}: {body}", c.name);
        let message = body["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(c.message),
            "{}: {message:?} should contain {:?}",
            c.name,
            c.message
        );
    }

    // The batch error names the index and field of each bad event.
    let (_, body) = post(
        &url,
        "/v1/events",
        Some("key-a"),
        json!([ok("u1"), {"event": 5, "partner_id": "partner-a", "user_id": "u"}, ok("u3")])
            .to_string(),
    )
    .await;
    assert_eq!(body["errors"][0]["index"], json!(1));
    assert_eq!(body["errors"][0]["field"], json!("event"));

    // Nothing of the above reached Kafka: after one valid event, the topic holds exactly one.
    let (status, _) = post(&url, "/v1/events", Some("key-a"), ok("only").to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let records = read_topic(&topic, 1, Duration::from_secs(2));
    assert_eq!(records.len(), 1, "rejected requests wrote nothing");
    assert_eq!(records[0].key, "partner-a:only");

    // The rejections are counted by reason.
    let metrics = client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pulse_ingest_events_rejected_total{reason=\"invalid\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("pulse_ingest_requests_total"), "{metrics}");
    // And the service is still fine for everyone.
    let ready = client().get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    ingest.stop().await.unwrap();
}

#[tokio::test]
async fn numeric_ids_beyond_two_to_the_53_keep_every_digit() {
    let topic = create_topic("it-bigids", 4).await;
    let ingest = RunningIngest::start(ingest_config(&topic)).await;
    // Raw text: a JSON library would round these through a float before we see them.
    let body = r#"[
        {"event":"purchase","partner_id":"partner-a","user_id":18446744073709551617,"message_id":18446744073709551617,"session_id":18446744073709551617,"product_id":18446744073709551617,"cart_amount":1},
        {"event":"purchase","partner_id":"partner-a","user_id":18446744073709551618,"message_id":18446744073709551618,"session_id":18446744073709551618,"product_id":18446744073709551618,"cart_amount":1},
        {"event":"page_view","partner_id":"partner-a","anonymous_id":18446744073709551619}
    ]"#;
    let (status, answer) = post(&ingest.url, "/v1/events", Some("key-a"), body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["message_ids"][0], json!("18446744073709551617"));
    assert_eq!(answer["message_ids"][1], json!("18446744073709551618"));
    let records = read_topic(&topic, 3, Duration::from_millis(500));
    let mut keys: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "partner-a:18446744073709551617",
            "partner-a:18446744073709551618",
            "partner-a:18446744073709551619"
        ],
        "two users, not one"
    );
    for r in &records {
        let e = Event::from_canonical_json(&r.payload).unwrap();
        let id = e.person_id().to_string();
        if e.event == "purchase" {
            assert_eq!(e.message_id, id);
            assert_eq!(e.session_id.as_deref(), Some(id.as_str()));
            assert_eq!(e.product_id.as_deref(), Some(id.as_str()));
        }
    }
    ingest.stop().await.unwrap();
}

#[tokio::test]
async fn unreachable_broker_gives_503_never_2xx() {
    // Nothing listens on port 1: not even the erasures can be read, so every request is
    // refused as retryable, and the process is alive but not ready.
    let mut config = ingest_config("events");
    config.kafka = pulse_core::kafka::KafkaArgs {
        brokers: "127.0.0.1:1".into(),
        options: vec![("message.timeout.ms".into(), "3000".into())],
    };
    config.retry_after_secs = 7;
    let ingest = RunningIngest::start_unready(config).await;
    let resp = client()
        .post(format!("{}/v1/events", ingest.url))
        .basic_auth("key-a", Some(""))
        .body(json!([{"event": "page_view", "partner_id": "partner-a", "user_id": "u", "message_id": "m"}]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "7");
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("erasures"),
        "{body}"
    );

    let ready = client()
        .get(format!("{}/readyz", ingest.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let healthy = client()
        .get(format!("{}/healthz", ingest.url))
        .send()
        .await
        .unwrap();
    assert_eq!(healthy.status(), StatusCode::OK, "alive, just not ready");
    ingest.stop().await.unwrap();
}

#[tokio::test]
async fn unacknowledged_writes_give_503_and_name_every_event() {
    // The broker answers but the topic does not exist (and is not created on use): every
    // write stays unacknowledged until it times out.
    let mut config = ingest_config(&unique("it-missing"));
    config.kafka.options = vec![
        ("message.timeout.ms".into(), "3000".into()),
        ("topic.metadata.propagation.max.ms".into(), "1000".into()),
    ];
    config.retry_after_secs = 7;
    let ingest = RunningIngest::start(config).await;

    // More events than the answer lists errors for.
    let ids: Vec<String> = (0..120).map(|i| format!("lost-{i}")).collect();
    let body: Vec<Value> = ids
        .iter()
        .map(|id| json!({"event": "page_view", "partner_id": "partner-a", "user_id": id, "message_id": id}))
        .collect();
    let body = Value::Array(body);
    let resp = client()
        .post(format!("{}/v1/events", ingest.url))
        .basic_auth("key-a", Some(""))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "7");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["accepted"], json!(0));
    let failed: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ids[..50], "the first 50 with their errors");
    let unacknowledged: Vec<&str> = body["unacknowledged_message_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap())
        .collect();
    assert_eq!(unacknowledged, ids, "every unacknowledged event is named");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("120 of 120") && message.contains("unacknowledged_message_ids"),
        "{message}"
    );
    ingest.stop().await.unwrap();
}

#[tokio::test]
async fn ready_when_topic_exists() {
    let topic = create_topic("it-ready", 3).await;
    let ingest = RunningIngest::start(ingest_config(&topic)).await;
    let resp = client()
        .get(format!("{}/readyz", ingest.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["partitions"], json!(3));
    ingest.stop().await.unwrap();

    // A missing topic is not ready.
    let ingest = RunningIngest::start(ingest_config(&unique("it-missing"))).await;
    let resp = client()
        .get(format!("{}/readyz", ingest.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    ingest.stop().await.unwrap();
}

#[tokio::test]
async fn browser_and_mobile_sdk_paths_cors_and_text_plain_bodies() {
    let topic = create_topic("it-sdk", 4).await;
    let keys = std::env::temp_dir().join(format!("{}.json", pulse_tests::unique("keys")));
    std::fs::write(
        &keys,
        r#"{"key-a": {"partner": "partner-a", "origins": ["https://shop-a.example"]}, "key-b": "partner-b"}"#,
    )
    .unwrap();
    let mut config = ingest_config(&topic);
    config.write_keys = vec![];
    config.write_keys_file = Some(keys.clone());
    let ingest = RunningIngest::start(config).await;
    let url = ingest.url.clone();
    let shop = "https://shop-a.example";

    // The preflight a browser sends before a JSON POST from another origin.
    let pre = client()
        .request(reqwest::Method::OPTIONS, format!("{url}/v1/t"))
        .header("origin", shop)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,authorization,x-retry-count",
        )
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success(), "{}", pre.status());
    let h = pre.headers();
    assert_eq!(h["access-control-allow-origin"], shop);
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    for name in ["content-type", "authorization", "x-retry-count"] {
        assert!(allowed.contains(name), "{allowed}");
    }
    assert!(h.get("access-control-allow-credentials").is_none());

    // Every path the official SDKs post to, as analytics.js sends it: text/plain, key in body.
    let calls = [
        (
            "/v1/t",
            json!({"type": "track", "event": "Product Added", "userId": "u1", "messageId": "sdk-t", "properties": {"price": 5}}),
        ),
        (
            "/v1/p",
            json!({"type": "page", "name": "Home", "anonymousId": "a1", "messageId": "sdk-p"}),
        ),
        (
            "/v1/i",
            json!({"type": "identify", "userId": "u1", "messageId": "sdk-i", "traits": {"gender": "female"}}),
        ),
        (
            "/v1/s",
            json!({"type": "screen", "userId": "u1", "messageId": "sdk-s"}),
        ),
        (
            "/v1/a",
            json!({"type": "alias", "userId": "u1", "previousId": "a1", "messageId": "sdk-a"}),
        ),
        (
            "/v1/g",
            json!({"type": "group", "userId": "u1", "groupId": "g1", "messageId": "sdk-g"}),
        ),
        (
            "/v1/b",
            json!({"batch": [{"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "sdk-b", "properties": {"total": "9.90"}}]}),
        ),
        (
            "/v1/alias",
            json!({"type": "alias", "userId": "u2", "previousId": "a2", "messageId": "sdk-alias"}),
        ),
        (
            "/v1/group",
            json!({"type": "group", "userId": "u2", "groupId": "g2", "messageId": "sdk-group"}),
        ),
    ];
    for (path, mut body) in calls.clone() {
        body["writeKey"] = json!("key-a");
        let resp = client()
            .post(format!("{url}{path}"))
            .header("content-type", "text/plain")
            .header("origin", shop)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let acao = resp.headers().get("access-control-allow-origin").cloned();
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status, StatusCode::OK, "{path}: {answer}");
        assert_eq!(answer, json!({"success": true}), "{path}");
        assert_eq!(
            acao.as_ref().and_then(|v| v.to_str().ok()),
            Some(shop),
            "{path}"
        );
    }

    // The same key from a page of another origin: refused, saying why; nothing written.
    let stolen = client()
        .post(format!("{url}/v1/t"))
        .header("content-type", "text/plain")
        .header("origin", "https://evil.example")
        .body(
            json!({"type": "track", "event": "x", "userId": "u9", "writeKey": "key-a"}).to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(stolen.status(), StatusCode::FORBIDDEN);
    let message = stolen.json::<Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("origin https://evil.example is not allowed")
            && message.contains("https://shop-a.example"),
        "{message}"
    );
    // A partner that listed no origins accepts any page (the default).
    let (status, _) = post(
        &url,
        "/v1/t",
        Some("key-b"),
        json!({"type": "track", "event": "x", "userId": "b1", "messageId": "sdk-b1"}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let records = read_topic(&topic, calls.len() + 1, Duration::from_millis(500));
    let _ = std::fs::remove_file(&keys);
    assert_eq!(
        records.len(),
        calls.len() + 1,
        "the refused call wrote nothing"
    );
    let events: Vec<Event> = records
        .iter()
        .map(|r| Event::from_canonical_json(&r.payload).unwrap())
        .collect();
    let by_id = |id: &str| events.iter().find(|e| e.message_id == id).unwrap();
    assert_eq!(by_id("sdk-t").event, "add_to_cart");
    assert_eq!(by_id("sdk-p").anonymous_id.as_deref(), Some("a1"));
    assert_eq!(by_id("sdk-a").event, "alias");
    assert_eq!(by_id("sdk-g").event, "group");
    assert_eq!(by_id("sdk-b").event, "purchase");
    assert!(events
        .iter()
        .filter(|e| e.message_id != "sdk-b1")
        .all(|e| e.partner_id == "partner-a"));
    assert_eq!(by_id("sdk-b1").partner_id, "partner-b");
    ingest.stop().await.unwrap();
}

/// A stop while clients are posting: ingest stops taking connections, finishes the requests
/// it took, and waits for Kafka's acknowledgements before it returns, so every event it
/// answered 200 for is in Kafka (the SIGTERM handler is `Shutdown::on_signals`, the same
/// future every service stops on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_clients_post_drains_and_every_accepted_event_is_in_kafka() {
    let topic = create_topic("it-drain", 4).await;
    let ingest = RunningIngest::start(ingest_config(&topic)).await;
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let url = format!("{}/v1/events", ingest.url);
            tokio::spawn(async move {
                let http = client();
                let mut accepted: Vec<String> = Vec::new();
                for i in 0.. {
                    let ids: Vec<String> = (0..20).map(|j| format!("drain-{c}-{i}-{j}")).collect();
                    let body: Vec<Value> = ids
                        .iter()
                        .map(|id| json!({"event": "page_view", "partner_id": "partner-a", "user_id": id, "message_id": id}))
                        .collect();
                    let sent = http.post(&url).basic_auth("key-a", Some("")).json(&body).send().await;
                    match sent {
                        Ok(r) if r.status() == StatusCode::OK => accepted.extend(ids),
                        // Refused (stopping) or cut off: this client is done.
                        _ => break,
                    }
                }
                accepted
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ingest.stop().await.expect("a clean stop");
    let mut accepted = Vec::new();
    for c in clients {
        accepted.extend(c.await.expect("client task"));
    }
    assert!(
        !accepted.is_empty(),
        "clients were answered before the stop"
    );
    let records = read_topic(&topic, accepted.len(), Duration::from_secs(1));
    let in_kafka: HashSet<String> = records
        .iter()
        .map(|r| {
            r.json()["message_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|id| !in_kafka.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} answered 200 but not in Kafka: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

fn erasure(partner: &str, id: &str) -> pulse_core::erasure::Erasure {
    pulse_core::erasure::Erasure {
        partner_id: partner.into(),
        id: id.into(),
        kind: pulse_core::erasure::IdKind::User,
        request_id: "test".into(),
        requested_at: chrono::Utc::now(),
    }
}

async fn erase(topic: &str, erasures: &[pulse_core::erasure::Erasure]) {
    let kafka = pulse_core::kafka::KafkaArgs::with_brokers(brokers());
    pulse_service::erasures::record(&kafka, topic, erasures)
        .await
        .expect("record erasures");
}

#[tokio::test]
async fn an_erased_persons_events_are_dropped_or_refused_and_nothing_else_is() {
    let topic = create_topic("it-erased", 4).await;
    let config = ingest_config(&topic);
    // Erased before ingest starts: read whole at start.
    erase(&config.erasures_topic, &[erasure("partner-a", "gone")]).await;
    let ingest = RunningIngest::start(config.clone()).await;
    let mut forbid = config.clone();
    forbid.erased_response = pulse_ingest::suppress::ErasedResponse::Forbid;
    let strict = RunningIngest::start(forbid).await;
    for url in [&ingest.url, &strict.url] {
        // 503 until the erasures are read: nothing is written that might be an erased one's.
        let ready = async {
            while client()
                .get(format!("{url}/readyz"))
                .send()
                .await
                .map(|r| r.status())
                .ok()
                != Some(StatusCode::OK)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .expect("ingest ready");
    }

    let mut batch = json!([event("kept-1", 1), event("gone", 2), event("kept-2", 3)]);
    batch[1]["anonymous_id"] = json!("device-of-gone");
    let (status, body) = post(&ingest.url, "/v1/events", Some("key-a"), batch.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], json!(3), "dropped silently: {body}");
    assert_eq!(
        body["message_ids"],
        json!(["m-kept-1-1", "m-gone-2", "m-kept-2-3"])
    );
    // Another partner's person with the same user id is not theirs to erase.
    let mut other = event("gone", 4);
    other["partner_id"] = json!("partner-b");
    let (status, body) = post(&ingest.url, "/v1/events", Some("key-b"), other.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Segment's API is suppressed alike.
    let segment = json!({"userId": "gone", "event": "Product Viewed", "messageId": "seg-gone"});
    let (status, _) = post(&ingest.url, "/v1/track", Some("key-a"), segment.to_string()).await;
    assert_eq!(status, StatusCode::OK);

    // --erased-response forbid: the whole request is refused, the erased event named.
    let (status, body) = post(&strict.url, "/v1/events", Some("key-a"), batch.to_string()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["errors"][0]["index"], json!(1), "{body}");
    assert_eq!(body["errors"][0]["message_id"], json!("m-gone-2"));

    // Erased while ingest runs: followed, within a poll or so.
    erase(&config.erasures_topic, &[erasure("partner-a", "kept-2")]).await;
    let late = event("kept-2", 5);
    let mut refused = false;
    for _ in 0..100 {
        let (status, _) = post(&strict.url, "/v1/events", Some("key-a"), late.to_string()).await;
        if status == StatusCode::FORBIDDEN {
            refused = true;
            break;
        }
        assert_eq!(status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "an erasure recorded while ingest runs reaches it");

    let records = read_topic(&topic, 3, Duration::from_secs(2));
    let users: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            let v = r.json();
            (
                v["partner_id"].as_str().unwrap().to_string(),
                v["user_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        !users.contains(&("partner-a".into(), "gone".into())),
        "nothing of the erased person reached Kafka: {users:?}"
    );
    assert!(users.contains(&("partner-a".into(), "kept-1".into())));
    assert!(users.contains(&("partner-b".into(), "gone".into())));
    ingest.stop().await.unwrap();
    strict.stop().await.unwrap();
}
