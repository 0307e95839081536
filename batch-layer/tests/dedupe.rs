//! The embedded engine's `events` (`pulse_batch::deduped_events`) keeps exactly the rows the
//! dedupe SQL that BigQuery loads run keeps (`pulse_batch::dedupe::first_of_each_message`),
//! over archive files on disk with copies of every kind: later and earlier retries, copies
//! tied on the receive time, producer retries identical bar their offset, copies in other
//! partitions and units; with filters on the key and filters that must wait for the dedupe.

use std::path::Path;

use chrono::Duration;
use object_store::{ObjectStore, ObjectStoreExt};
use pulse_archive::parquet_file::{self, Codec};
use pulse_archive::progress::{self, Coverage};
use pulse_batch::layout::{self, FileRange};
use pulse_batch::{dedupe, sql};
use pulse_core::Event;
use pulse_tests::data::generate;
use pulse_tests::unique;

/// Writes `rows` (partition, events in offset order) as committed units of 50 records.
async fn archive(store: &dyn ObjectStore, partition: i32, events: &[Event]) {
    let mut coverage = Coverage::default();
    for (u, unit) in events.chunks(50).enumerate() {
        let first = (u * 50) as i64;
        let range = FileRange {
            partition,
            first,
            last: first + unit.len() as i64 - 1,
        };
        let mut by_day: std::collections::BTreeMap<_, Vec<(i64, Event)>> = Default::default();
        for (i, e) in unit.iter().enumerate() {
            by_day
                .entry(e.timestamp.date_naive())
                .or_default()
                .push((first + i as i64, e.clone()));
        }
        for (dt, rows) in by_day {
            let bytes = parquet_file::write(partition, &rows, Codec::Zstd).unwrap();
            store
                .put(&layout::data_path(dt, range), bytes.into())
                .await
                .unwrap();
        }
        coverage.add(range.first, range.last);
        store
            .put(
                &progress::marker_path(partition, range.last),
                progress::marker_body(&coverage).into(),
            )
            .await
            .unwrap();
    }
}

/// Every row of `sql`, as text, sorted.
async fn rows(store: std::sync::Arc<dyn ObjectStore>, sql: &str) -> Vec<String> {
    let batches = sql::query(store, sql).await.unwrap();
    let text = sql::render(&batches, sql::OutputFormat::Json).unwrap();
    let parsed: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
    let mut out: Vec<String> = parsed.iter().map(|row| row.to_string()).collect();
    out.sort();
    out
}

#[tokio::test]
async fn the_embedded_events_keep_the_rows_the_dedupe_sql_keeps() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-archives")
        .join(unique("dedupe"));
    let store =
        pulse_archive::store::open_store(&pulse_archive::store::StoreArgs::local(&dir)).unwrap();
    let events = generate(1_200, 61, 80, 3);
    let (mut p0, mut p1) = (Vec::new(), Vec::new());
    for (i, e) in events.iter().enumerate() {
        p0.push(e.clone());
        let mut copy = e.clone();
        match i % 6 {
            // A retry received later, in the same partition, some units on.
            0 => copy.received_at += Duration::seconds(5),
            // A retry received earlier (an ingest replica whose clock is behind): it wins.
            1 => copy.received_at -= Duration::seconds(5),
            // Tied on the receive time: the next columns decide.
            2 => copy.event = "aaa_first_by_name".into(),
            // A producer retry: identical but for its offset.
            3 => {}
            // Another user's event with the same id, in the other partition: one row.
            4 => {
                copy.user_id = Some(format!("other-{i}"));
                p1.push(copy);
                continue;
            }
            _ => continue,
        }
        p0.push(copy);
    }
    // The copies come after the originals, as retries do.
    let (originals, copies) = p0.split_at(events.len());
    let mut p0: Vec<Event> = originals.to_vec();
    p0.extend(copies.iter().cloned());
    archive(store.as_ref(), 0, &p0).await;
    archive(store.as_ref(), 1, &p1).await;
    let raw = rows(store.clone(), "SELECT * FROM events_raw").await;
    assert_eq!(raw.len(), p0.len() + p1.len());

    let reference = dedupe::first_of_each_message(sql::RAW_TABLE, None);
    let want = rows(store.clone(), &reference).await;
    assert_eq!(want.len(), events.len(), "one row per message id and day");
    assert_eq!(rows(store.clone(), "SELECT * FROM events").await, want);

    // A filter on the key deduplicates that day alone, with the same result.
    let day = events[0].timestamp.date_naive();
    let on_day = format!("WHERE `date` = DATE '{day}'");
    assert_eq!(
        rows(store.clone(), &format!("SELECT * FROM events {on_day}")).await,
        rows(
            store.clone(),
            &format!("SELECT * FROM ({reference}) AS e {on_day}")
        )
        .await
    );
    // Any other filter waits for the dedupe: the renamed copies win their tie by name, so
    // their originals are gone, also from a query that leaves the renamed rows out.
    let others = "WHERE event <> 'aaa_first_by_name'";
    let got = rows(
        store.clone(),
        &format!("SELECT message_id FROM events {others}"),
    )
    .await;
    let ids = |rows: &[String]| -> Vec<String> {
        rows.iter()
            .map(|r| {
                serde_json::from_str::<serde_json::Value>(r).unwrap()["message_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let expected = rows(
        store.clone(),
        &format!("SELECT message_id FROM ({reference}) AS e {others}"),
    )
    .await;
    assert_eq!(got, expected);
    let renamed: Vec<&str> = events
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 6 == 2)
        .map(|(_, e)| e.message_id.as_str())
        .collect();
    assert!(!renamed.is_empty());
    assert!(
        renamed.iter().all(|id| !ids(&got).iter().any(|g| g == id)),
        "an original whose copy won came back once the copy was filtered out"
    );
    assert_eq!(got.len(), events.len() - renamed.len());
    let count = "SELECT COUNT(*), COUNT(DISTINCT message_id) FROM events";
    assert_eq!(
        rows(store.clone(), count).await,
        vec![format!(
            "{{\"count(*)\":{0},\"count(DISTINCT events.message_id)\":{0}}}",
            events.len()
        )]
    );
}
