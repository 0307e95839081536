//! Segment's official SDKs, unchanged, against Pulse ingest (issue 10): the browser SDK
//! (`@segment/analytics-next`) on a shop page of another origin in headless Chromium, the Node
//! SDK and the Python SDK. Every call is read back from Kafka with its partner, key and fields.
//! The tools come from `deploy/local/stack tools` (see `pulse_tests::sdk`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use pulse_core::Event;
use pulse_tests::proxy::CutProxy;
use pulse_tests::sdk::{Driver, SdkTools, ShopPage};
use pulse_tests::*;
use rust_decimal::Decimal;
use serde_json::{json, Value};

/// Write keys for the browser tests: partner A allows only the shop page's origin, partner C
/// only a site that is not this one.
fn keys_file(shop_origin: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.json", unique("sdk-keys")));
    let keys = json!({
        "key-a": {"partner": "partner-a", "origins": [shop_origin]},
        "key-c": {"partner": "partner-c", "origins": ["https://shop-c.example"]},
    });
    std::fs::write(&path, keys.to_string()).expect("write keys file");
    path
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

fn path_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.find('/').map_or("/".into(), |i| rest[i..].to_string())
}

fn decimal(s: &str) -> Option<Decimal> {
    Some(s.parse().expect("decimal"))
}

/// Reads `topic` until `ids` are in; checks each arrived once with the key Pulse derives from
/// the event, and returns the events by message id.
fn read_back(topic: &str, ids: &[String]) -> HashMap<String, Event> {
    let records = read_topic(topic, ids.len(), Duration::from_secs(1));
    let mut events = HashMap::new();
    for r in &records {
        let e = Event::from_canonical_json(&r.payload).expect("canonical event");
        assert_eq!(r.key, e.partition_key(), "{e:?}");
        assert!(
            events.insert(e.message_id.clone(), e).is_none(),
            "a message id twice in Kafka"
        );
    }
    let missing: Vec<&String> = ids.iter().filter(|id| !events.contains_key(*id)).collect();
    assert!(missing.is_empty(), "not in Kafka: {missing:?}");
    assert_eq!(records.len(), ids.len(), "records that no call sent");
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_sdk_on_a_shop_page_of_another_origin_delivers_every_call() {
    let tools = SdkTools::from_env();
    let topic = create_topic("it-browser", 4).await;
    let shop = ShopPage::serve(&tools).await;
    let keys = keys_file(&shop.origin);
    let mut config = ingest_config(&topic);
    config.write_keys = vec![];
    config.write_keys_file = Some(keys.clone());
    let ingest = RunningIngest::start(config).await;
    // ingest is on 127.0.0.1, the page on localhost: two origins, as on a partner's site.
    assert_ne!(shop.origin, ingest.url);

    let mut sent: Vec<(String, Vec<String>, String)> = Vec::new();
    for (batch, email) in [(false, "ada@example.com"), (true, "bob@example.com")] {
        let url = shop.url(&ingest.url, "key-a", batch);
        let out = Driver::run(tools.node("browser.cjs", &["shop", &url, &ingest.url, email])).await;
        assert_eq!(out["allAccepted"], true, "{out}");
        let requests = out["requests"].as_array().expect("requests");
        let paths: HashSet<String> = requests
            .iter()
            .map(|r| path_of(r["url"].as_str().unwrap()))
            .collect();
        // The SDK's own paths: one letter per call type, or /v1/b when it batches. The
        // beacon and the partner's JSON call use /v1/t and /v1/track.
        let expected: &[&str] = if batch {
            &["/v1/b", "/v1/t", "/v1/track"]
        } else {
            &["/v1/p", "/v1/i", "/v1/t", "/v1/track"]
        };
        assert_eq!(
            paths,
            expected.iter().map(|p| p.to_string()).collect(),
            "{out}"
        );
        for r in requests {
            assert_eq!(r["status"], 200, "batch={batch}: {r}");
            if r["type"] == "fetch" {
                // Without this header the browser hides the answer and the SDK retries forever.
                assert_eq!(
                    r["responseHeaders"]["access-control-allow-origin"],
                    json!(shop.origin),
                    "{r}"
                );
            }
        }
        // The partner's own JSON call with Basic auth passed the preflight and was readable.
        assert_eq!(out["jsonFetch"]["status"], 200, "{}", out["jsonFetch"]);
        assert_eq!(out["jsonFetch"]["body"], json!({"success": true}));
        let mut ids = strings(&out["calls"]);
        assert_eq!(ids.len(), 8, "{out}");
        ids.push(out["jsonFetch"]["messageId"].as_str().unwrap().to_string());
        sent.push((email.to_string(), ids, out["log"].to_string()));
    }

    // Partner C allows only its own site: from this page its key gets 403, saying why, and
    // the SDK (which does not retry a 403) sends nothing more.
    let url = shop.url(&ingest.url, "key-c", false);
    let out = Driver::run(tools.node("browser.cjs", &["refused", &url, &ingest.url])).await;
    let requests = out["requests"].as_array().expect("requests");
    assert!(!requests.is_empty(), "{out}");
    for r in requests {
        assert_eq!(r["status"], 403, "{r}");
        let answer = r["answer"].as_str().unwrap_or_default();
        assert!(
            answer.contains(&format!("origin {} is not allowed", shop.origin))
                && answer.contains("https://shop-c.example"),
            "{answer}"
        );
    }

    let all: Vec<String> = sent.iter().flat_map(|(_, ids, _)| ids.clone()).collect();
    let events = read_back(&topic, &all);
    ingest.stop().await.unwrap();
    let _ = std::fs::remove_file(&keys);

    for (email, ids, log) in &sent {
        let e = |i: usize| &events[&ids[i]];
        let page = e(0);
        assert_eq!(page.event, "page_view", "{log}");
        assert_eq!(page.user_id, None);
        let anonymous = page.anonymous_id.clone().expect("the SDK's anonymous id");
        assert!(
            page.current_url
                .as_deref()
                .is_some_and(|u| u.starts_with(&shop.origin)),
            "{page:?}"
        );
        assert!(
            page.user_agent
                .as_deref()
                .is_some_and(|ua| ua.contains("Chrome")),
            "{page:?}"
        );
        let identify = e(1);
        assert_eq!(identify.event, "identify");
        assert_eq!(identify.gender.as_deref(), Some("female"));
        let expect = [
            (2, "search"),
            (3, "product_view"),
            (4, "add_to_cart"),
            (5, "add_to_cart"),
            (6, "purchase"),
            (7, "page_left"),
        ];
        for (i, event) in expect {
            assert_eq!(e(i).event, event, "call {i}: {log}");
        }
        // From identify on, every call carries the user and still the same anonymous id.
        for i in 1..8 {
            assert_eq!(e(i).user_id.as_deref(), Some(email.as_str()), "call {i}");
            assert_eq!(
                e(i).anonymous_id.as_deref(),
                Some(anonymous.as_str()),
                "call {i}"
            );
            assert_eq!(e(i).partner_id, "partner-a");
        }
        assert_eq!(e(2).search_query.as_deref(), Some("running shoes"));
        assert_eq!(e(3).product_id.as_deref(), Some("sku-shoe"));
        assert_eq!(e(3).category, vec!["Shoes".to_string()]);
        assert_eq!(e(4).cart_amount, decimal("89.90"));
        assert_eq!(e(5).cart_amount, decimal("4.95"));
        assert_eq!(e(6).cart_amount, decimal("94.85"), "exact, no float drift");
        let json_call = e(8);
        assert_eq!(json_call.event, "coupon_entered");
        assert_eq!(json_call.user_id.as_deref(), Some("json-user"));
        assert_eq!(json_call.partner_id, "partner-a");
    }
    assert!(events.values().all(|e| e.partner_id != "partner-c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_sdk_retries_through_a_kafka_outage_until_pulse_accepts_every_call() {
    let tools = SdkTools::from_env();
    let topic = create_topic("it-browser-outage", 4).await;
    let shop = ShopPage::serve(&tools).await;
    // Ingest reaches the broker through the stack's CUTTABLE listener and a proxy the test can
    // cut.
    let (proxy, advertised) = CutProxy::for_cuttable_broker().await;
    let mut config = ingest_config(&topic);
    config.kafka = pulse_core::kafka::KafkaArgs {
        brokers: advertised,
        options: vec![("message.timeout.ms".into(), "3000".into())],
    };
    config.retry_after_secs = 2;
    let ingest = RunningIngest::start(config).await;

    proxy.cut();
    let url = shop.url(&ingest.url, "key-a", false);
    let mut driver = Driver::spawn(tools.node(
        "browser.cjs",
        &["outage", &url, &ingest.url, "cyd@example.com"],
    ));
    // The first answer during the outage: 503 with Retry-After, never a 2xx or a 4xx.
    let first = driver.next().await;
    assert_eq!(first["unavailable"]["retryAfter"], "2", "{first}");
    proxy.restore();
    let out = driver.next().await;
    assert_eq!(out["allAccepted"], true, "{out}");
    let statuses: Vec<i64> = out["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["status"].as_i64())
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    assert!(statuses.contains(&503) && statuses.contains(&200));

    // page, identify and the cart, each in Kafka once: nothing reached the broker while it
    // was cut, and each retry after it was restored was accepted at its first try.
    let ids = strings(&out["calls"]);
    assert_eq!(ids.len(), 3, "{out}");
    let events = read_back(&topic, &ids);
    ingest.stop().await.unwrap();
    assert_eq!(events[&ids[0]].event, "page_view");
    assert_eq!(events[&ids[1]].event, "identify");
    let cart = &events[&ids[2]];
    assert_eq!(cart.event, "add_to_cart");
    assert_eq!(cart.product_id.as_deref(), Some("sku-cap"));
    assert_eq!(cart.cart_amount, decimal("19.00"));
    assert_eq!(cart.user_id.as_deref(), Some("cyd@example.com"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_and_python_sdks_deliver_their_batches() {
    let tools = SdkTools::from_env();
    let topic = create_topic("it-server-sdks", 4).await;
    let ingest = RunningIngest::start(ingest_config(&topic)).await;

    // The Node SDK batches to /v1/batch with the key in Basic auth (JSON bodies).
    let node = Driver::run(tools.node("node.cjs", &[&ingest.url, "key-a", "node-user"])).await;
    assert_eq!(node["errors"], json!([]), "{node}");
    let paths: HashSet<String> = node["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| path_of(r["url"].as_str().unwrap()))
        .collect();
    assert_eq!(paths, HashSet::from(["/v1/batch".to_string()]));
    // The Python SDK too, gzip-compressed.
    let python =
        Driver::run(tools.python("python_sdk.py", &[&ingest.url, "key-b", "py-user"])).await;
    assert_eq!(python["errors"], json!([]), "{python}");

    let ids = |out: &Value| -> Vec<String> {
        out["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["messageId"].as_str().unwrap().to_string())
            .collect()
    };
    let (node_ids, python_ids) = (ids(&node), ids(&python));
    let all: Vec<String> = node_ids.iter().chain(&python_ids).cloned().collect();
    let events = read_back(&topic, &all);
    ingest.stop().await.unwrap();

    let types = [
        "identify",
        "page_view",
        "add_to_cart",
        "purchase",
        "screen_view",
        "group",
        "alias",
    ];
    for (ids, partner, user, gender, line, order) in [
        (
            &node_ids,
            "partner-a",
            "node-user",
            "male",
            "59.97",
            "59.97",
        ),
        (
            &python_ids,
            "partner-b",
            "py-user",
            "female",
            "25.00",
            "25.00",
        ),
    ] {
        let e = |i: usize| &events[&ids[i]];
        for (i, t) in types.iter().enumerate() {
            assert_eq!(e(i).event, *t, "{partner} call {i}");
            assert_eq!(e(i).partner_id, partner);
            assert_eq!(e(i).user_id.as_deref(), Some(user), "{partner} call {i}");
        }
        assert_eq!(e(0).gender.as_deref(), Some(gender));
        // "Product Added": unit price times quantity, exactly.
        assert_eq!(e(2).cart_amount, decimal(line), "{partner}");
        assert_eq!(e(3).cart_amount, decimal(order), "{partner}");
    }
    assert_eq!(
        events[&node_ids[2]].category,
        vec!["Shoes".to_string(), "Sale".to_string()]
    );
    assert_eq!(events[&node_ids[2]].product_id.as_deref(), Some("sku-42"));
    assert_eq!(events[&python_ids[2]].product_id.as_deref(), Some("sku-7"));
}
