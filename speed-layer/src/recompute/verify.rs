//! Verify: the new index against the one the alias points to, every document (both read in
//! `profile_id` order with `search_after` and merged), not a sample.
//!
//! A live document whose watermark is at or past the recompute's position on its partition
//! changed after the recompute stopped reading (the live layer runs on): it is counted as
//! "ahead" and not compared, since the new index cannot have those events yet. Every other
//! document must be equal in every field the events decide (`updated_at`, the flush's clock,
//! is not compared), except the fields named `--expect-changed` (after a model change: the
//! model's fields).
//!
//! A model's answer may depend on when it was written as well as on its state (the 7-day
//! gender counts the days up to the write). Two documents written on different days can hold
//! the same state and different answers: when each answer is what its own state gives at its
//! own `updated_at`, the difference is counted as `answers_as_of_write`, not as a defect.
//!
//! Identity state is compared like the rest: a recompute replays the live layer's identity
//! records by the live layer's rules (see `run`), so a merged device's pointer, a person's
//! `aliases` and `identity` (links asked, refused, merge positions) come out equal.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::{indices, kafka, RecomputeArgs, RecomputeError};
use crate::store::ProfileStore;

/// Not decided by events: when the document was written.
const WRITE_TIME: &str = "updated_at";

/// The remembered message ids, stored in more than one encoding over Pulse's versions (see
/// [`crate::dedupe`]): compared by the ids they hold, not by their text.
const DEDUPE: &str = "dedupe";
/// Documents per page of each side.
const PAGE: usize = 1_000;
/// Example differences printed.
const EXAMPLES: usize = 5;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PartnerCounts {
    pub live_docs: u64,
    pub new_docs: u64,
    pub live_total_purchases: Decimal,
    pub new_total_purchases: Decimal,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Verification {
    pub live_index: String,
    pub new_index: String,
    pub partners: BTreeMap<String, PartnerCounts>,
    pub compared: u64,
    /// Changed in the live index after the recompute's position: not compared.
    pub live_ahead: u64,
    /// Documents with a model answer that differs only because the two were written at other
    /// times (equal model state, each answer right for its own write time); such a document
    /// may still differ in other fields, which are counted as usual.
    pub answers_as_of_write: u64,
    pub only_live: u64,
    pub only_new: u64,
    /// Documents that differ, by field (dotted path, two levels deep).
    pub differing_fields: BTreeMap<String, u64>,
    pub differing_docs: u64,
    /// Documents that differ in a field not expected to change.
    pub unexpected: u64,
    pub examples: Vec<String>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.unexpected == 0 && self.only_live == 0 && self.only_new == 0
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} (live) against {} (new)",
            self.live_index, self.new_index
        );
        let _ = writeln!(
            out,
            "{:<24} {:>10} {:>10} {:>22} {:>22}",
            "partner", "live docs", "new docs", "live total_purchases", "new total_purchases"
        );
        for (partner, c) in &self.partners {
            let _ = writeln!(
                out,
                "{partner:<24} {:>10} {:>10} {:>22} {:>22}",
                c.live_docs,
                c.new_docs,
                c.live_total_purchases.normalize(),
                c.new_total_purchases.normalize()
            );
        }
        let _ = writeln!(
            out,
            "compared {} documents: {} differ ({} unexpectedly), {} only in live, {} only in new, {} ahead in live (not compared), {} with answers as of another write time (same state)",
            self.compared, self.differing_docs, self.unexpected, self.only_live, self.only_new, self.live_ahead, self.answers_as_of_write
        );
        for (field, n) in &self.differing_fields {
            let _ = writeln!(out, "  {field}: {n} documents");
        }
        for e in &self.examples {
            let _ = writeln!(out, "  e.g. {e}");
        }
        out
    }
}

/// Compares `args.index` with the alias's index; `expected` are fields allowed to differ.
pub async fn verify(
    args: &RecomputeArgs,
    expected: &[String],
) -> Result<Verification, RecomputeError> {
    // Answers are re-derived with the flags the indices were built with.
    crate::models::windowed_gender::set_window_days(args.speed.window_days);
    let live = ProfileStore::new(&args.speed.es)?;
    let alias = &args.speed.es.alias;
    let live_index = indices::alias_target(&live, alias)
        .await?
        .ok_or_else(|| RecomputeError::Refused(format!("alias {alias} points nowhere")))?;
    if live_index == args.index {
        return Err(RecomputeError::Refused(format!(
            "{} is the live index itself: verify a new index against it",
            args.index
        )));
    }
    let topic = &args.speed.topics.events;
    let partitions = kafka::retained(&args.speed.kafka, topic)?.partitions();
    let position = kafka::committed(&args.speed.kafka, &args.group(), topic, &partitions)?;
    let (old, new) = (live.on_index(&live_index), live.on_index(&args.index));
    old.refresh().await?;
    new.refresh().await?;
    let mut report = Verification {
        live_index,
        new_index: args.index.clone(),
        ..Verification::default()
    };
    let expected: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    let (mut a, mut b) = (Pages::new(&old), Pages::new(&new));
    let (mut x, mut y) = (a.next().await?, b.next().await?);
    loop {
        match (x.take(), y.take()) {
            (None, None) => break,
            (Some(l), None) => {
                report.live_only(&l, &position);
                x = a.next().await?;
            }
            (None, Some(n)) => {
                report.new_only(&n);
                y = b.next().await?;
            }
            (Some(l), Some(n)) => match id(&l).cmp(id(&n)) {
                std::cmp::Ordering::Less => {
                    report.live_only(&l, &position);
                    (x, y) = (a.next().await?, Some(n));
                }
                std::cmp::Ordering::Greater => {
                    report.new_only(&n);
                    (x, y) = (Some(l), b.next().await?);
                }
                std::cmp::Ordering::Equal => {
                    report.both(&l, &n, &position, &expected);
                    (x, y) = (a.next().await?, b.next().await?);
                }
            },
        }
    }
    Ok(report)
}

fn id(doc: &Value) -> &str {
    doc["profile_id"].as_str().unwrap_or_default()
}

fn amount(doc: &Value) -> Decimal {
    doc["total_purchases"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_default()
}

/// Whether the live layer changed `doc` after the recompute's position on its partition.
fn ahead(doc: &Value, position: &BTreeMap<i32, i64>) -> bool {
    let w = &doc["watermark"];
    match (w["partition"].as_i64(), w["offset"].as_i64()) {
        (Some(p), Some(o)) => position.get(&(p as i32)).is_none_or(|next| o >= *next),
        _ => false,
    }
}

impl Verification {
    fn partner(&mut self, doc: &Value) -> &mut PartnerCounts {
        let partner = doc["partner_id"].as_str().unwrap_or_default().to_string();
        self.partners.entry(partner).or_default()
    }

    fn count_live(&mut self, doc: &Value) {
        let c = self.partner(doc);
        c.live_docs += 1;
        c.live_total_purchases += amount(doc);
    }

    fn count_new(&mut self, doc: &Value) {
        let c = self.partner(doc);
        c.new_docs += 1;
        c.new_total_purchases += amount(doc);
    }

    fn live_only(&mut self, doc: &Value, position: &BTreeMap<i32, i64>) {
        self.count_live(doc);
        match ahead(doc, position) {
            true => self.live_ahead += 1,
            false => {
                self.only_live += 1;
                self.example(format!("{}: only in live", id(doc)));
            }
        }
    }

    fn new_only(&mut self, doc: &Value) {
        self.count_new(doc);
        self.only_new += 1;
        self.example(format!("{}: only in new", id(doc)));
    }

    fn both(
        &mut self,
        live: &Value,
        new: &Value,
        position: &BTreeMap<i32, i64>,
        expected: &BTreeSet<&str>,
    ) {
        self.count_live(live);
        self.count_new(new);
        if ahead(live, position) {
            self.live_ahead += 1;
            return;
        }
        self.compared += 1;
        let mut paths = Vec::new();
        differing_paths(live, new, "", 2, &mut paths);
        paths.retain(|p| p != WRITE_TIME);
        if same_ids_remembered(live, new) {
            paths.retain(|p| p != DEDUPE && !p.starts_with("dedupe."));
        }
        if answers_as_of_write(live, new, &mut paths) {
            self.answers_as_of_write += 1;
        }
        if paths.is_empty() {
            return;
        }
        self.differing_docs += 1;
        for p in &paths {
            *self.differing_fields.entry(p.clone()).or_default() += 1;
        }
        let unexpected: Vec<&String> = paths
            .iter()
            .filter(|p| {
                !expected
                    .iter()
                    .any(|e| p == e || p.starts_with(&format!("{e}.")))
            })
            .collect();
        if !unexpected.is_empty() {
            self.unexpected += 1;
            let p = unexpected[0];
            self.example(format!(
                "{}: {p}: {} (live) vs {} (new)",
                id(live),
                at(live, p),
                at(new, p)
            ));
        }
    }

    fn example(&mut self, text: String) {
        if self.examples.len() < EXAMPLES {
            self.examples.push(text);
        }
    }
}

/// Whether both documents remember the same message ids (whatever encoding each has).
fn same_ids_remembered(live: &Value, new: &Value) -> bool {
    use crate::dedupe::RecentMessages;
    RecentMessages::from_json(live.get(DEDUPE)) == RecentMessages::from_json(new.get(DEDUPE))
}

/// Drops from `paths` the model answers that differ only by write time: the model's state is
/// equal on both sides, and each side's answer is what that state gives at its `updated_at`.
/// Whether it dropped any.
fn answers_as_of_write(live: &Value, new: &Value, paths: &mut Vec<String>) -> bool {
    let before = paths.len();
    for kind in crate::models::registry() {
        let state = format!("models.{}", kind.name);
        if !paths.iter().any(|p| p == kind.field) || paths.contains(&state) {
            continue;
        }
        let as_written = |doc: &Value| {
            let stored = &doc["models"][kind.name];
            let written = doc[WRITE_TIME]
                .as_i64()
                .and_then(chrono::DateTime::from_timestamp_millis);
            match (stored.is_null(), written) {
                (false, Some(at)) => json!(kind.load(stored.clone()).answer(at)) == doc[kind.field],
                _ => false,
            }
        };
        if as_written(live) && as_written(new) {
            paths.retain(|p| p != kind.field);
        }
    }
    paths.len() < before
}

/// The value at a dotted path.
fn at<'a>(doc: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(doc, |v, k| v.get(k).unwrap_or(&Value::Null))
}

/// The dotted paths (to `depth` levels of objects) where `a` and `b` differ.
fn differing_paths(a: &Value, b: &Value, prefix: &str, depth: usize, out: &mut Vec<String>) {
    if a == b {
        return;
    }
    match (a.as_object(), b.as_object()) {
        (Some(x), Some(y)) if depth > 0 => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let path = match prefix {
                    "" => k.clone(),
                    p => format!("{p}.{k}"),
                };
                let (u, v) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                differing_paths(u, v, &path, depth - 1, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

/// One index's documents in `profile_id` order, a page at a time.
struct Pages<'a> {
    store: &'a ProfileStore,
    page: std::vec::IntoIter<Value>,
    after: Option<Value>,
    done: bool,
}

impl<'a> Pages<'a> {
    fn new(store: &'a ProfileStore) -> Self {
        Self {
            store,
            page: Vec::new().into_iter(),
            after: None,
            done: false,
        }
    }

    async fn next(&mut self) -> Result<Option<Value>, RecomputeError> {
        if let Some(doc) = self.page.next() {
            return Ok(Some(doc));
        }
        if self.done {
            return Ok(None);
        }
        let mut query = json!({
            "size": PAGE,
            "query": {"match_all": {}},
            "sort": [{"profile_id": "asc"}],
        });
        if let Some(after) = &self.after {
            query["search_after"] = after.clone();
        }
        let body = self.store.search(query).await?;
        let hits = body["hits"]["hits"].as_array().cloned().unwrap_or_default();
        self.done = hits.len() < PAGE;
        self.after = hits.last().map(|h| h["sort"].clone());
        self.page = hits
            .into_iter()
            .map(|h| h["_source"].clone())
            .collect::<Vec<_>>()
            .into_iter();
        Ok(self.page.next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_paths_name_the_changed_model_not_the_whole_object() {
        let a = json!({"profile_id": "p:u", "models": {"gender_7d": "f", "gender": "f"}, "event_count": 3});
        let b = json!({"profile_id": "p:u", "models": {"gender_7d": "m", "gender": "f"}, "event_count": 3});
        let mut out = Vec::new();
        differing_paths(&a, &b, "", 2, &mut out);
        assert_eq!(out, vec!["models.gender_7d"]);
    }

    /// The same 7-day state written ten days apart: the answers differ and both are right.
    #[test]
    fn an_answer_that_differs_only_by_write_time_is_not_a_difference() {
        use crate::models::WindowedTopGender;
        use chrono::{TimeZone, Utc};
        use pulse_core::{parse_event, ParseContext};
        let visit = parse_event(
            r#"{"event":"page_view","partner_id":"p","user_id":"u","gender":"male","timestamp":"2026-11-01T12:00:00Z"}"#,
            &ParseContext::now(),
        )
        .unwrap();
        let mut model = WindowedTopGender::default();
        crate::models::ProfileModel::fold(&mut model, &visit);
        let state = serde_json::to_value(&model).unwrap();
        let ms = |day| {
            Utc.with_ymd_and_hms(2026, 11, day, 18, 0, 0)
                .unwrap()
                .timestamp_millis()
        };
        let doc = |day, answer: Value, state: &Value| json!({"profile_id": "p:u", "updated_at": ms(day), "gender_top_7d": answer, "models": {"MODEL3": state}});
        let differing = |a: &Value, b: &Value| {
            let mut paths = Vec::new();
            differing_paths(a, b, "", 2, &mut paths);
            paths.retain(|p| p != WRITE_TIME);
            let explained = answers_as_of_write(a, b, &mut paths);
            (paths, explained)
        };
        let live = doc(2, json!("male"), &state);
        let (paths, explained) = differing(&live, &doc(12, Value::Null, &state));
        assert!(paths.is_empty() && explained, "{paths:?}");
        // An answer its own state does not give is a difference.
        let (paths, _) = differing(&live, &doc(12, json!("female"), &state));
        assert_eq!(paths, ["gender_top_7d"]);
        // So is a different state (a model change), with its answer.
        let (paths, explained) = differing(&live, &doc(12, Value::Null, &json!({"days": {}})));
        assert_eq!(paths, ["gender_top_7d", "models.MODEL3"]);
        assert!(!explained);
    }

    #[test]
    fn identity_state_is_compared_like_any_field() {
        let position: BTreeMap<i32, i64> = [(0, 100)].into();
        let at = json!({"partition": 0, "offset": 5});
        let mut v = Verification::default();
        // A person the recompute did not merge the device into.
        let person = json!({"profile_id": "p:u", "partner_id": "p", "event_count": 5, "aliases": ["d"], "watermark": at});
        let unmerged =
            json!({"profile_id": "p:u", "partner_id": "p", "event_count": 3, "watermark": at});
        v.both(&person, &unmerged, &position, &BTreeSet::new());
        assert_eq!(
            (v.unexpected, v.differing_fields.get("aliases")),
            (1, Some(&1))
        );
        // A device's pointer the recompute does not have.
        let pointer =
            json!({"profile_id": "p:d0", "partner_id": "p", "merged_into": "u", "watermark": at});
        v.live_only(&pointer, &position);
        assert_eq!(v.only_live, 1);
        // A link refused in one and not the other.
        let refused = json!({"profile_id": "p:x", "partner_id": "p", "event_count": 2, "identity": {"refused": [{"anonymous_id": "t", "reason": "r"}]}, "watermark": at});
        let plain =
            json!({"profile_id": "p:x", "partner_id": "p", "event_count": 2, "watermark": at});
        v.both(&refused, &plain, &position, &BTreeSet::new());
        assert_eq!(v.unexpected, 2);
        assert!(!v.ok());
        // Equal identity state is equal.
        let mut same = Verification::default();
        same.both(&person, &person, &position, &BTreeSet::new());
        same.both(&pointer, &pointer, &position, &BTreeSet::new());
        assert!(same.ok() && same.differing_docs == 0, "{same:?}");
    }

    #[test]
    fn remembered_ids_in_the_older_encoding_are_the_same_ids() {
        use base64::Engine;
        use sha2::{Digest, Sha256};
        let position: BTreeMap<i32, i64> = [(0, 100)].into();
        let at = json!({"partition": 0, "offset": 5});
        let mut recent = crate::dedupe::RecentMessages::default();
        let policy = crate::dedupe::DedupePolicy::default();
        recent.insert(crate::dedupe::MessageDigest::of("m-1"), 7_000, &policy);
        // The same id as a version-1 document stored it: 96 bits of digest, then the time.
        let mut v1 = Sha256::digest(b"m-1")[..12].to_vec();
        v1.extend_from_slice(&7u32.to_be_bytes());
        let v1 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(v1);
        let old = json!({"profile_id": "p:u", "dedupe": {"v": 1, "entries": v1}, "watermark": at});
        let new = json!({"profile_id": "p:u", "dedupe": recent.to_json(), "watermark": at});
        let mut v = Verification::default();
        v.both(&old, &new, &position, &BTreeSet::new());
        assert!(v.ok() && v.differing_docs == 0, "{v:?}");
        // Other ids are a difference.
        recent.insert(crate::dedupe::MessageDigest::of("m-2"), 8_000, &policy);
        let more = json!({"profile_id": "p:u", "dedupe": recent.to_json(), "watermark": at});
        v.both(&old, &more, &position, &BTreeSet::new());
        assert_eq!(v.differing_fields.get("dedupe.entries"), Some(&1), "{v:?}");
    }

    #[test]
    fn a_live_document_past_the_recompute_position_is_ahead() {
        let doc = json!({"watermark": {"partition": 2, "offset": 40}});
        let position: BTreeMap<i32, i64> = [(2, 41)].into();
        assert!(!ahead(&doc, &position));
        let position: BTreeMap<i32, i64> = [(2, 40)].into();
        assert!(ahead(&doc, &position));
    }
}
