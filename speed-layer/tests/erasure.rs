//! Erasure against the real stack (`pulse_core::erasure`): a person erased while the live
//! speed layer runs leaves its memory and the live index, and their later events do not bring
//! them back; a recompute folded before the erasure is cleansed of them when it is promoted.
//! Everybody else's profile is whole throughout.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use pulse_core::erasure::{Erasure, IdKind};
use pulse_core::kafka::KafkaArgs;
use pulse_core::Event;
use serde_json::Value;

/// `n` more events like `model` (same partner, person, session), new message ids.
fn more_like(model: &Event, n: usize, tag: &str) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let mut e = model.clone();
            e.message_id = format!("{tag}-{i}");
            e.timestamp = Utc::now();
            e
        })
        .collect()
}

/// Polls the live index until `done` holds of its documents, or PATIENCE × 3.
async fn documents_until(
    f: &Fixture,
    done: impl Fn(&HashMap<String, Value>) -> bool,
) -> HashMap<String, Value> {
    let deadline = Instant::now() + PATIENCE * 3;
    loop {
        let docs = f.documents().await;
        if done(&docs) || Instant::now() > deadline {
            return docs;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_person_leaves_the_live_index_stays_gone_and_a_promoted_recompute_drops_them() {
    let f = Fixture::new("erasure", 2).await;
    let events = generate(1_000, 41, 40, 5);
    let truth = ground_truth(&events);
    // The person: shop-a's busiest user. The same user id at shop-b is another person.
    let person = events
        .iter()
        .filter(|e| e.partner_id == "shop-a" && e.user_id.is_some())
        .max_by_key(|e| truth[&format!("shop-a:{}", e.person_id())].event_count)
        .expect("a shop-a user")
        .clone();
    let person_id = format!("shop-a:{}", person.person_id());
    let namesake = format!("shop-b:{}", person.person_id());
    let other = events
        .iter()
        .find(|e| e.partner_id == "shop-a" && e.person_id() != person.person_id())
        .expect("another shop-a person")
        .clone();
    let other_id = format!("shop-a:{}", other.person_id());

    let mut live = f.spawn_speed(&["--flush-interval-secs", "0.5"]);
    produce(&f.topic, &events).await;
    let docs = f.wait_for_events(events.len() as u64).await;
    assert_eq!(diff(&docs, &truth), Vec::<String>::new());
    terminate(&mut live);

    // A recompute run before the erasure holds the person.
    let v2 = format!("{}-v2", f.alias);
    succeeded(&recompute(&f, "run", &v2, &["--source", "kafka"]));
    assert!(documents_of(&f, &v2).await.contains_key(&person_id));

    // Erased while the live layer runs (the topic did not exist when it started).
    let mut live = f.spawn_speed(&["--flush-interval-secs", "0.5"]);
    let erasure = Erasure {
        partner_id: "shop-a".into(),
        id: person.person_id().to_string(),
        kind: IdKind::User,
        request_id: "req-1".into(),
        requested_at: Utc::now(),
    };
    let kafka = KafkaArgs {
        brokers: brokers(),
        options: vec![],
    };
    pulse_service::erasures::record(&kafka, &f.erasures, &[erasure])
        .await
        .expect("record the erasure");
    let docs = documents_until(&f, |d| !d.contains_key(&person_id)).await;
    assert!(
        !docs.contains_key(&person_id),
        "the live layer deleted the person's profile"
    );
    assert_eq!(docs.len(), truth.len() - 1, "and nobody else's");

    // Their later events are passed over; another person's are folded.
    produce(&f.topic, &more_like(&person, 5, "erased-later")).await;
    produce(&f.topic, &more_like(&other, 3, "other-later")).await;
    let other_before = truth[&other_id].event_count;
    let docs = documents_until(&f, |d| {
        d[&other_id]["event_count"].as_u64() == Some(other_before + 3)
    })
    .await;
    assert_eq!(
        docs[&other_id]["event_count"].as_u64(),
        Some(other_before + 3)
    );
    assert!(
        !docs.contains_key(&person_id),
        "later events bring nobody back"
    );
    if truth.contains_key(&namesake) {
        assert_eq!(
            docs[&namesake]["event_count"].as_u64(),
            Some(truth[&namesake].event_count),
            "the same id at another partner is another person"
        );
    }
    terminate(&mut live);

    // The recompute, promoted now, catches up without the person and is cleansed of the
    // profile it folded before the erasure.
    let switch = succeeded(&recompute(&f, "promote", &v2, &["--source", "kafka"]));
    assert_eq!(switch["erased_deleted"], 1, "{switch}");
    let promoted = f.documents().await;
    assert!(!promoted.contains_key(&person_id));
    assert_eq!(promoted.len(), truth.len() - 1);
    assert_eq!(
        promoted[&other_id]["event_count"].as_u64(),
        Some(other_before + 3),
        "the catch-up folded the other person's later events"
    );
}
