//! Identity unification against real Kafka and Elasticsearch: anonymous devices merged into
//! the person who logged in on them, exactly once across partitions, through SIGKILLs and a
//! rebalance; and the guards (a shared device, junk ids, the alias cap, partners apart, a
//! person's id sent as an anonymous id), retries after a merge, triggers not fired again, and
//! the profile API answering for a device with its person.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::identities::*;
use common::*;
use pulse_core::Event;
use pulse_service::keys::{KeyKind, PartnerKeys};
use pulse_speed::api::{router, ApiState};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_are_exact_across_partitions_through_sigkills_and_a_rebalance() {
    let f = Fixture::new("identity", 12).await;
    let stream = identity_stream(300, 0x1d3a_55e7);
    let truth = truth_of(&stream);
    assert!(
        stream.linked.len() > 200,
        "{} devices linked",
        stream.linked.len()
    );
    // Frequent small flushes, so kills land before, during and after flushes and merges; a
    // short session timeout so a survivor takes over a killed replica's partitions quickly.
    let args = [
        "--flush-interval-secs",
        "0.2",
        "--bulk-docs",
        "200",
        "--kafka-opt",
        "session.timeout.ms=6000",
    ];
    // Each replica SIGKILLs itself where a failpoint says, whatever the machine's speed: at a
    // login (the person folded it; the link may or may not be out), at an event of a linked
    // device (forwarded, or folded before its link: merges in flight around it), and, with a
    // second replica sharing the partitions, at the first event with both ids it handles.
    let logins: Vec<&Event> = stream.phases[1]
        .iter()
        .filter(|e| e.event == "identify")
        .collect();
    let device_events: Vec<&Event> = stream.phases[2]
        .iter()
        .filter(|e| e.user_id.is_none() && stream.linked.contains_key(&e.partition_key()))
        .collect();
    let with_both: Vec<String> = stream.phases[3]
        .iter()
        .filter(|e| e.user_id.is_some() && e.anonymous_id.is_some())
        .map(|e| e.message_id.clone())
        .collect();
    let kill_points = [
        logins[logins.len() / 2].message_id.clone(),
        device_events[device_events.len() / 3].message_id.clone(),
        with_both.join(","),
    ];
    let spawn =
        |kill_at: &str| f.spawn_speed_env(&args, &[("PULSE_FAILPOINT_KILL_MESSAGE_IDS", kill_at)]);
    let mut partial = Vec::new();
    let mut a = spawn(&kill_points[0]);
    produce(&f.topic, &stream.phases[0]).await;
    produce(&f.topic, &stream.phases[1]).await;
    let mut b = None;
    for (i, next) in [&stream.phases[2], &stream.phases[3]]
        .into_iter()
        .enumerate()
    {
        let status = wait_exit(&mut a).await;
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "killed by failpoint {i}"
        );
        let (people, pointers) = split(&f.documents().await);
        partial.push((people.len(), pointers.len()));
        a = spawn(&kill_points[i + 1]);
        if i == 1 {
            // A second replica: the partitions are shared out while merges are under way;
            // it takes over the first one's after that is killed.
            b = Some(f.spawn_speed(&args));
        }
        produce(&f.topic, next).await;
        if i == 0 {
            produce(&f.topic, &stream.retries).await;
        }
    }
    let status = wait_exit(&mut a).await;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "killed by failpoint 2"
    );
    let mut b = b.expect("second replica");
    eprintln!("people and merged devices stored at the kills: {partial:?}");

    let (people, pointers, problems) = people_once_equal(&f, &truth, PATIENCE * 4).await;
    terminate(&mut b);
    assert!(
        problems.is_empty(),
        "after SIGKILLs and a rebalance during merges, people differ from the ground truth:\n{}",
        problems.join("\n")
    );
    let mut want_pointers: Vec<_> = stream.linked.iter().collect();
    want_pointers.sort();
    let mut got_pointers: Vec<_> = pointers.iter().collect();
    got_pointers.sort();
    assert_eq!(
        got_pointers, want_pointers,
        "each merged device points to its person"
    );
    for (device, person) in &stream.linked {
        let aliases: Vec<&str> = people[person]["aliases"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let device_id = device.split_once(':').unwrap().1;
        assert!(
            aliases.contains(&device_id),
            "{person} lists {device_id}: {aliases:?}"
        );
    }
}

/// The test's partner events, by hand.
fn ev(partner: &str, who: Value, kind: &str, id: &str, extra: Value) -> Event {
    let mut v = json!({"event": kind, "partner_id": partner, "message_id": id});
    for (k, val) in who
        .as_object()
        .unwrap()
        .iter()
        .chain(extra.as_object().unwrap())
    {
        v[k] = val.clone();
    }
    event(v)
}

fn anon(id: &str) -> Value {
    json!({"anonymous_id": id})
}

fn user(id: &str) -> Value {
    json!({"user_id": id})
}

fn both(user: &str, anon: &str) -> Value {
    json!({"user_id": user, "anonymous_id": anon})
}

/// Polls until `check` holds of the documents (or PATIENCE ran out); returns them.
async fn until(
    f: &Fixture,
    check: impl Fn(&HashMap<String, Value>) -> bool,
) -> HashMap<String, Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let docs = f.documents().await;
        if check(&docs) || Instant::now() > deadline {
            return docs;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_hold_and_a_merged_device_answers_for_its_person() {
    let f = Fixture::new("identity-guards", 6).await;
    let rules = std::env::temp_dir().join(format!("{}.toml", f.alias));
    std::fs::write(&rules, CART_RULE).unwrap();
    // Every profile evicted after each flush: pointers and people are read back from
    // Elasticsearch before each step, as after a restart or a long pause.
    let args = [
        "--flush-interval-secs",
        "0.2",
        "--idle-evict-secs",
        "0",
        "--max-aliases",
        "2",
        "--junk-ids",
        "guest",
        "--rules-file",
        rules.to_str().unwrap(),
    ];
    let mut speed = f.spawn_speed(&args);
    let cart =
        |amount: &str| json!({"cart_amount": amount, "gender": "female", "category": ["toys"]});
    let tablet_cart = ev(
        "shop-a",
        anon("tablet"),
        "add_to_cart",
        "t-1",
        cart("10.50"),
    );
    // The devices browse first (in Kafka before any login is read, so the tablet's cart is
    // folded before its merge).
    let devices = vec![
        ev(
            "shop-a",
            anon("tablet"),
            "page_view",
            "t-0",
            json!({"gender": "female"}),
        ),
        tablet_cart.clone(),
        ev("shop-a", anon("d1"), "page_view", "x-1", json!({})),
        ev("shop-a", anon("d2"), "page_view", "x-2", json!({})),
        ev("shop-a", anon("d3"), "page_view", "x-3", json!({})),
        ev(
            "shop-a",
            anon("old-phone"),
            "product_view",
            "s-0",
            json!({"gender": "male"}),
        ),
    ];
    produce(&f.topic, &devices).await;
    let first = vec![
        // A family tablet browsed, filled a cart; mum logs in on it.
        ev(
            "shop-a",
            user("mum"),
            "purchase",
            "m-0",
            json!({"cart_amount": "5"}),
        ),
        ev(
            "shop-a",
            both("mum", "tablet"),
            "identify",
            "m-1",
            json!({}),
        ),
        // The same anonymous id at another partner: another device, never linked here.
        ev("shop-b", anon("tablet"), "add_to_cart", "b-1", cart("7")),
        // Junk anonymous ids (built in, and the operator's own "guest") link nothing.
        ev("shop-a", anon("undefined"), "page_view", "j-0", json!({})),
        ev(
            "shop-a",
            both("jo", "undefined"),
            "identify",
            "j-1",
            json!({}),
        ),
        ev("shop-a", both("jo", "NULL"), "page_view", "j-2", json!({})),
        ev("shop-a", both("jo", "Guest"), "page_view", "j-3", json!({})),
        // A person who logs in on three devices, with at most two aliases.
        ev("shop-a", both("many", "d1"), "identify", "x-4", json!({})),
        ev("shop-a", both("many", "d2"), "identify", "x-5", json!({})),
        ev("shop-a", both("many", "d3"), "identify", "x-6", json!({})),
        // A broken integration's junk user id collects no devices.
        ev("shop-a", anon("dev-x"), "page_view", "u-0", json!({})),
        ev(
            "shop-a",
            both("undefined", "dev-x"),
            "identify",
            "u-1",
            json!({}),
        ),
        // An alias whose previousId no profile id could hold is ignored.
        ev(
            "shop-a",
            user("sam"),
            "alias",
            "s-2",
            json!({"properties": {"previousId": "x".repeat(600)}}),
        ),
        // Someone sends a user id nobody has used yet as their anonymous id: a pointer to
        // them, until that user's own first event reclaims it.
        ev(
            "shop-a",
            both("mallory", "victim@example.com"),
            "identify",
            "v-0",
            json!({}),
        ),
        // A Segment alias call: previousId → userId.
        ev(
            "shop-a",
            user("sam"),
            "alias",
            "s-1",
            json!({"properties": {"previousId": "old-phone"}}),
        ),
    ];
    produce(&f.topic, &first).await;
    let docs = until(&f, |d| {
        strings(
            &d.get("shop-a:mum")
                .map_or(Value::Null, |m| m["aliases"].clone()),
        )
        .contains("tablet")
            && d.get("shop-a:sam")
                .is_some_and(|s| s["aliases"] == json!(["old-phone"]))
            && d.get("shop-a:many").is_some_and(|m| {
                m["identity"]["refused"].is_array() && strings(&m["aliases"]).len() == 2
            })
    })
    .await;
    let mum = &docs["shop-a:mum"];
    assert_eq!(mum["aliases"], json!(["tablet"]), "{mum}");
    assert_eq!(
        mum["event_count"],
        json!(4),
        "page view, cart, purchase, identify: {mum}"
    );
    assert_eq!(
        mum["cart_amount"],
        json!("10.5"),
        "the tablet's open cart is carried over"
    );
    assert_eq!(mum["total_purchases"], json!("5"));
    assert_eq!(mum["gender_last"], json!("female"));
    assert_eq!(docs["shop-a:tablet"]["merged_into"], json!("mum"));
    assert!(
        docs["shop-a:tablet"].get("event_count").is_none(),
        "a pointer, not a person"
    );
    // The other partner's device of the same id is untouched.
    assert_eq!(docs["shop-b:tablet"]["event_count"], json!(1));
    assert!(docs["shop-b:tablet"].get("merged_into").is_none());
    // Junk ids linked nothing.
    assert!(
        docs["shop-a:jo"].get("aliases").is_none(),
        "{}",
        docs["shop-a:jo"]
    );
    assert!(docs["shop-a:undefined"].get("merged_into").is_none());
    // Two aliases at most: the third device was refused, counted and listed.
    let many = &docs["shop-a:many"];
    assert_eq!(
        strings(&many["aliases"]),
        BTreeSet::from(["d1".into(), "d2".into()])
    );
    assert_eq!(
        many["identity"]["refused"][0]["anonymous_id"],
        json!("d3"),
        "{many}"
    );
    assert!(docs["shop-a:d3"].get("merged_into").is_none());
    assert_eq!(
        docs["shop-a:sam"]["gender_last"],
        json!("male"),
        "the alias merged the old phone"
    );
    assert!(
        docs["shop-a:dev-x"].get("merged_into").is_none(),
        "a junk user id links nothing"
    );
    assert!(docs["shop-a:undefined"].get("identity").is_none());
    assert_eq!(
        docs["shop-a:sam"]["aliases"],
        json!(["old-phone"]),
        "the overlong previousId is ignored"
    );
    assert!(docs.keys().all(|id| id.len() <= 512));

    // Dad logs in on the same tablet: the first link stands. Eve sends mum's user id as her
    // anonymous id: a person is never merged into another.
    let second = vec![
        // The victim's own events are theirs: the pointer mallory made is reclaimed.
        ev(
            "shop-a",
            user("victim@example.com"),
            "add_to_cart",
            "v-1",
            cart("30"),
        ),
        ev(
            "shop-a",
            both("dad", "tablet"),
            "identify",
            "d-1",
            json!({}),
        ),
        ev("shop-a", both("eve", "mum"), "identify", "e-1", json!({})),
    ];
    produce(&f.topic, &second).await;
    let docs = until(&f, |d| {
        ["shop-a:dad", "shop-a:eve"].iter().all(|id| {
            d.get(*id)
                .is_some_and(|p| p["identity"]["refused"].is_array())
        }) && d
            .get("shop-a:victim@example.com")
            .is_some_and(|v| v["event_count"] == json!(1))
    })
    .await;
    assert_eq!(
        docs["shop-a:dad"]["identity"]["refused"][0]["reason"],
        json!("already linked to another user")
    );
    assert!(docs["shop-a:dad"].get("aliases").is_none());
    let eve = &docs["shop-a:eve"]["identity"]["refused"][0];
    assert_eq!(eve["anonymous_id"], json!("mum"));
    assert!(
        eve["reason"].as_str().unwrap().contains("is a person"),
        "{eve}"
    );
    assert_eq!(docs["shop-a:mum"]["event_count"], json!(4), "mum untouched");
    let victim = &docs["shop-a:victim@example.com"];
    assert_eq!(
        (victim["event_count"].clone(), victim.get("merged_into")),
        (json!(1), None),
        "{victim}"
    );
    assert_eq!(
        docs["shop-a:mallory"]["event_count"],
        json!(1),
        "mallory got none of the victim's events"
    );

    // After the merge: the tablet's new cart lands in mum's profile (and is pushed to her), a
    // client retry of its cart from before the merge is recognised, dad's own events stay his.
    let third = vec![
        ev("shop-a", anon("tablet"), "add_to_cart", "t-2", cart("2.25")),
        tablet_cart.clone(),
        ev(
            "shop-a",
            user("dad"),
            "page_view",
            "d-2",
            json!({"gender": "male"}),
        ),
    ];
    produce(&f.topic, &third).await;
    let docs = until(&f, |d| {
        d.get("shop-a:mum")
            .is_some_and(|m| m["event_count"] == json!(5))
            && d.get("shop-a:dad")
                .is_some_and(|m| m["event_count"] == json!(2))
    })
    .await;
    let mum = &docs["shop-a:mum"];
    assert_eq!(
        mum["event_count"],
        json!(5),
        "the retry counted once: {mum}"
    );
    assert_eq!(mum["cart_amount"], json!("12.75"));
    assert_eq!(docs["shop-a:dad"]["event_count"], json!(2));

    // Each cart fired once: the tablet's first cart for the tablet (before the merge), its
    // second for mum, the other partner's for its own device; the merge and the retry none.
    let rule = pulse_speed::triggers::RuleSet::from_toml(CART_RULE)
        .unwrap()
        .rules
        .remove(0);
    let b_cart = &first[2];
    let want: BTreeSet<String> = [
        rule.idempotency_key_for(&tablet_cart, "tablet"),
        rule.idempotency_key_for(&third[0], "mum"),
        rule.idempotency_key(b_cart),
        rule.idempotency_key(&second[0]),
    ]
    .into();
    let fired = read_topic(&f.triggers, 4, Duration::from_secs(3));
    let keys: BTreeSet<String> = fired
        .iter()
        .map(|r| r.json()["idempotency_key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, want);
    assert_eq!(fired.len(), 4, "no trigger fired twice");
    let to_mum = fired
        .iter()
        .find(|r| r.json()["message_id"] == json!("t-2"))
        .unwrap();
    assert_eq!(
        to_mum.key, "shop-a:mum",
        "the merged device's cart is pushed to the person"
    );

    terminate(&mut speed);

    // The profile API answers for the tablet with mum's profile, and only with shop-a's key.
    let read_keys = PartnerKeys::load_kind(
        KeyKind::Read,
        None,
        &["ra=shop-a".into(), "rb=shop-b".into()],
    )
    .unwrap();
    let api = ApiState::new(f.store.clone(), read_keys, None).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(Arc::new(api))).await });
    let client = reqwest::Client::new();
    let get = |path: &str, key: &str| {
        let req = client.get(format!("{url}{path}")).basic_auth(key, Some(""));
        async move {
            let resp = req.send().await.unwrap();
            (
                resp.status().as_u16(),
                resp.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, profile) = get("/api/v1/profiles/tablet", "ra").await;
    assert_eq!(status, 200);
    assert_eq!(profile["user_id"], json!("mum"));
    assert_eq!(profile["event_count"], json!(5));
    assert!(
        profile["identity"].get("sources").is_none(),
        "internal positions left out"
    );
    let (status, gender) = get("/api/v1/getGender/tablet?model=MODEL2", "ra").await;
    assert_eq!((status, gender["gender"].clone()), (200, json!("female")));
    // shop-b's tablet is shop-b's own device.
    let (status, profile) = get("/api/v1/profiles/tablet", "rb").await;
    assert_eq!((status, profile["user_id"].clone()), (200, json!("tablet")));
    // Nothing of shop-a's people reached shop-b: its only documents are its own device's.
    let b_ids: HashSet<&str> = docs
        .keys()
        .map(String::as_str)
        .filter(|id| id.starts_with("shop-b:"))
        .collect();
    assert_eq!(
        b_ids,
        HashSet::from(["shop-b:tablet"]),
        "nothing crossed partners"
    );
}

/// `pulse-speed identities unlink` on this fixture (history from Kafka: the test has no
/// archive).
fn unlink(f: &Fixture, partner: &str, device: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pulse-speed"))
        .args(["identities", "unlink", "--partner", partner])
        .args(["--anonymous-id", device, "--source", "kafka"])
        .args(["--kafka-brokers", &brokers(), "--es-url", &es_url()])
        .args(["--events-topic", &f.topic, "--dlq-topic", &f.dlq])
        .args([
            "--triggers-topic",
            &f.triggers,
            "--unlinks-topic",
            &unlinks_topic(f),
        ])
        .args(["--profiles-alias", &f.alias, "--group", &f.group])
        .env("RUST_LOG", "info,librdkafka=warn")
        .output()
        .expect("run pulse-speed identities unlink")
}

fn unlinks_topic(f: &Fixture) -> String {
    format!("{}.unlinks", f.topic)
}

/// People and unmerged devices equal `truth` (waiting for the live layer), and the pointers
/// are `linked` less `unlinked`.
async fn people_are(f: &Fixture, truth: &HashMap<String, Truth>, stream: &Stream, unlinked: &str) {
    let (people, pointers, problems) = people_once_equal(f, truth, PATIENCE * 2).await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let mut want: Vec<(&String, &String)> = stream
        .linked
        .iter()
        .filter(|(device, _)| device.as_str() != unlinked)
        .collect();
    want.sort();
    let mut got: Vec<(&String, &String)> = pointers.iter().collect();
    got.sort();
    assert_eq!(got, want, "pointers");
    assert!(
        unlinked.is_empty() || people.contains_key(unlinked),
        "{unlinked} is a profile again"
    );
}

/// An operator undoes a merge (a family's shared tablet): the device and its person are
/// refolded as if the link had never been made, the link is not made again (the person's
/// later events with both ids and the device's own events stay apart), and a recompute
/// reaches the same documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlinked_device_is_split_from_its_person_exactly_and_never_linked_again() {
    let f = Fixture::new("unlink", 4).await;
    let stream = identity_stream(40, 0x0a11_7e57);
    // user-0 logs in on two devices: one is unlinked, the other stays merged.
    let (device, person) = ("shop-a:device-0-0", "shop-a:user-0");
    assert_eq!(stream.linked.get(device).map(String::as_str), Some(person));
    assert!(stream.linked.contains_key("shop-a:device-0-1"));
    let args = [
        "--flush-interval-secs",
        "0.3",
        "--unlinks-topic",
        &unlinks_topic(&f),
    ];
    let args: Vec<&str> = args.iter().map(|s| s.as_ref()).collect();
    let mut live = f.spawn_speed(&args);
    for phase in &stream.phases[..3] {
        produce(&f.topic, phase).await;
    }
    produce(&f.topic, &stream.retries).await;
    people_are(&f, &truth_until(&stream, 3, &[]), &stream, "").await;

    // A running live layer is refused: its commit is not final.
    let refused = unlink(&f, "shop-a", "device-0-0");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("stop the live speed layer"), "{err}");
    terminate(&mut live);
    // Not merged: nothing to unlink.
    let never = unlink(&f, "shop-a", "user-1");
    assert!(!never.status.success());

    let out = unlink(&f, "shop-a", "device-0-0");
    let report = succeeded(&out);
    eprintln!("unlink: {report}");
    assert_eq!(report["user_id"], "user-0", "{report}");
    let truth = truth_until(&stream, 3, &[device]);
    assert_eq!(
        report["device"]["event_count"].as_u64(),
        Some(truth[device].event_count),
        "{report}"
    );
    people_are(&f, &truth, &stream, device).await;
    let docs = f.documents().await;
    let aliases = strings(&docs[person]["aliases"]);
    assert_eq!(aliases, BTreeSet::from(["device-0-1".to_string()]));
    // Running it again changes nothing.
    succeeded(&unlink(&f, "shop-a", "device-0-0"));
    people_are(&f, &truth, &stream, device).await;

    // The live layer goes on under the unlink: the device's events stay its own, the
    // person's events with both ids link nothing.
    let mut live = f.spawn_speed(&args);
    produce(&f.topic, &stream.phases[3]).await;
    people_are(&f, &truth_until(&stream, 4, &[device]), &stream, device).await;
    let docs = f.documents().await;
    let refused: Vec<&str> = docs[person]["identity"]["refused"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["anonymous_id"] == "device-0-0")
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert!(
        refused.len() == 1 && refused[0].starts_with("unlinked"),
        "{refused:?}"
    );
    terminate(&mut live);

    // A recompute of the whole history applies the unlink from the start: the same documents.
    let live_docs = documents_of(&f, &format!("{}-v1", f.alias)).await;
    let v2 = format!("{}-v2", f.alias);
    let unlinks = unlinks_topic(&f);
    succeeded(&recompute(
        &f,
        "run",
        &v2,
        &["--source", "kafka", "--unlinks-topic", &unlinks],
    ));
    assert_eq!(
        differences(&live_docs, &documents_of(&f, &v2).await),
        Vec::<String>::new(),
        "a recompute after the unlink"
    );

    // Once retention dropped the start of a partition, Kafka alone cannot refold it: the
    // other device's unlink is refused before anything is recorded.
    let partition = |id: &str| pulse_core::partitioner::partition_of(id.as_bytes(), 4);
    expire_records(&f.topic, partition("shop-a:device-0-1"), 1).await;
    expire_records(&f.topic, partition(person), 1).await;
    let out = unlink(&f, "shop-a", "device-0-1");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no longer holds partition"), "{err}");
    let docs = f.documents().await;
    assert!(
        docs["shop-a:device-0-1"]["merged_into"].is_string(),
        "still merged"
    );
}
