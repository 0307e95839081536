//! One user's live profile: folding events in, and the Elasticsearch document it is kept as.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use pulse_core::Event;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::models::{ModelKind, ModelState};

/// Distinct categories kept per profile, most recent first.
pub const MAX_CATEGORIES: usize = 20;

/// Where in the topic the last event folded into a profile came from. Events at or below it are
/// already in the profile and are skipped when re-read after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub partition: i32,
    pub offset: i64,
}

/// The profile of `{partner_id}:{user}`.
#[derive(Debug, Clone)]
pub struct Profile {
    pub id: String,
    pub partner_id: String,
    pub user_id: String,
    pub anonymous: bool,
    pub session_id: Option<String>,
    pub partner_name: Option<String>,
    pub country: Option<String>,
    pub version: Option<String>,
    pub language: Option<String>,
    pub referrer: Option<String>,
    pub user_agent: Option<String>,
    /// Epoch seconds of the newest event.
    pub last_visit: i64,
    /// Epoch seconds of the oldest event.
    pub first_seen: i64,
    pub category: Vec<String>,
    /// Exact sum of purchase amounts.
    pub total_purchases: Decimal,
    pub purchase_count: u64,
    /// The open cart: add_to_cart adds, remove_from_cart subtracts, purchase empties it.
    pub cart_amount: Decimal,
    pub event_count: u64,
    pub event_counts: BTreeMap<String, u64>,
    pub watermark: Option<Watermark>,
    /// Model name → state, for the models enabled.
    pub models: BTreeMap<&'static str, Box<dyn ModelState>>,
}

/// What folding one record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    Applied,
    /// At or below the watermark: already in the profile.
    Skipped,
}

impl Profile {
    pub fn new(event: &Event, models: &[ModelKind]) -> Self {
        let ts = event.timestamp.timestamp();
        Self {
            id: event.partition_key(),
            partner_id: event.partner_id.clone(),
            user_id: event.person_id().to_string(),
            anonymous: event.user_id.is_none(),
            session_id: None,
            partner_name: None,
            country: None,
            version: None,
            language: None,
            referrer: None,
            user_agent: None,
            last_visit: ts,
            first_seen: ts,
            category: Vec::new(),
            total_purchases: Decimal::ZERO,
            purchase_count: 0,
            cart_amount: Decimal::ZERO,
            event_count: 0,
            event_counts: BTreeMap::new(),
            watermark: None,
            models: models.iter().map(|k| (k.name, k.fresh())).collect(),
        }
    }

    /// Folds the event read at `at`, unless the profile already contains it.
    pub fn fold(&mut self, event: &Event, at: Watermark) -> Fold {
        if let Some(w) = self.watermark {
            if w.partition == at.partition && at.offset <= w.offset {
                return Fold::Skipped;
            }
        }
        self.watermark = Some(at);
        let ts = event.timestamp.timestamp();
        self.last_visit = self.last_visit.max(ts);
        self.first_seen = self.first_seen.min(ts);
        self.event_count += 1;
        match self.event_counts.get_mut(&event.event) {
            Some(n) => *n += 1,
            None => {
                self.event_counts.insert(event.event.clone(), 1);
            }
        }
        let latest = |slot: &mut Option<String>, v: &Option<String>| {
            if v.is_some() {
                slot.clone_from(v);
            }
        };
        latest(&mut self.session_id, &event.session_id);
        latest(&mut self.partner_name, &event.partner_name);
        latest(&mut self.country, &event.country);
        latest(&mut self.version, &event.version);
        latest(&mut self.language, &event.language);
        latest(&mut self.referrer, &event.referrer);
        latest(&mut self.user_agent, &event.user_agent);
        for c in event.category.iter().rev() {
            self.category.retain(|x| x != c);
            self.category.insert(0, c.clone());
        }
        self.category.truncate(MAX_CATEGORIES);
        let amount = event.cart_amount.unwrap_or_default();
        match event.event.as_str() {
            "purchase" => {
                self.total_purchases += amount;
                self.purchase_count += 1;
                self.cart_amount = Decimal::ZERO;
            }
            "add_to_cart" => self.cart_amount += amount,
            "remove_from_cart" => self.cart_amount = (self.cart_amount - amount).max(Decimal::ZERO),
            _ => {}
        }
        for model in self.models.values_mut() {
            model.fold(event);
        }
        Fold::Applied
    }

    /// The Elasticsearch document. Amounts are exact decimal strings in `_source` (mapped as
    /// `double` for range queries) plus exact integer minor units for sums.
    pub fn to_document(&self, kinds: &[ModelKind], now: DateTime<Utc>) -> Value {
        let mut doc = json!({
            "profile_id": self.id,
            "partner_id": self.partner_id,
            "user_id": self.user_id,
            "anonymous": self.anonymous,
            "last_visit": self.last_visit,
            "first_seen": self.first_seen,
            "category": self.category,
            "total_purchases": self.total_purchases.normalize().to_string(),
            "total_purchases_minor": minor_units(self.total_purchases),
            "purchase_count": self.purchase_count,
            "cart_amount": self.cart_amount.normalize().to_string(),
            "event_count": self.event_count,
            "event_counts": self.event_counts,
            "watermark": self.watermark,
            "updated_at": now.timestamp_millis(),
        });
        let obj = doc.as_object_mut().expect("json! object");
        for (k, v) in [
            ("session_id", &self.session_id),
            ("partner_name", &self.partner_name),
            ("country", &self.country),
            ("version", &self.version),
            ("language", &self.language),
            ("referrer", &self.referrer),
            ("user_agent", &self.user_agent),
        ] {
            if let Some(v) = v {
                obj.insert(k.into(), json!(v));
            }
        }
        let mut states = Map::new();
        for kind in kinds {
            if let Some(model) = self.models.get(kind.name) {
                obj.insert(kind.field.into(), json!(model.answer(now)));
                states.insert(kind.name.into(), model.to_json());
            }
        }
        obj.insert("models".into(), Value::Object(states));
        doc
    }

    /// Restores a profile from its document. Models missing from the document (enabled after
    /// it was written) start empty.
    pub fn from_document(doc: &Value, kinds: &[ModelKind]) -> Result<Self, String> {
        let s = |k: &str| doc.get(k).and_then(Value::as_str).map(str::to_string);
        let n = |k: &str| doc.get(k).and_then(Value::as_i64).unwrap_or_default();
        let d = |k: &str| {
            doc.get(k)
                .and_then(Value::as_str)
                .map(|t| t.parse::<Decimal>().map_err(|e| format!("{k}: {e}")))
                .transpose()
                .map(Option::unwrap_or_default)
        };
        let stored_models = doc.get("models").and_then(Value::as_object);
        Ok(Self {
            id: s("profile_id").ok_or("profile_id missing")?,
            partner_id: s("partner_id").ok_or("partner_id missing")?,
            user_id: s("user_id").ok_or("user_id missing")?,
            anonymous: doc
                .get("anonymous")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            session_id: s("session_id"),
            partner_name: s("partner_name"),
            country: s("country"),
            version: s("version"),
            language: s("language"),
            referrer: s("referrer"),
            user_agent: s("user_agent"),
            last_visit: n("last_visit"),
            first_seen: n("first_seen"),
            category: doc
                .get("category")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            total_purchases: d("total_purchases")?,
            purchase_count: n("purchase_count") as u64,
            cart_amount: d("cart_amount")?,
            event_count: n("event_count") as u64,
            event_counts: doc
                .get("event_counts")
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or_default(),
            watermark: doc
                .get("watermark")
                .and_then(|v| serde_json::from_value(v.clone()).ok()),
            models: kinds
                .iter()
                .map(|k| {
                    let state = stored_models.and_then(|m| m.get(k.name)).cloned();
                    (k.name, state.map_or_else(|| k.fresh(), |s| k.load(s)))
                })
                .collect(),
        })
    }
}

/// Hundredths, for integer sums in aggregations. Exact for amounts with at most two decimals;
/// finer amounts are rounded half-even here only (the decimal string stays exact).
fn minor_units(amount: Decimal) -> i64 {
    use rust_decimal::prelude::ToPrimitive;
    (amount * Decimal::ONE_HUNDRED)
        .round()
        .to_i64()
        .unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::registry;
    use pulse_core::{parse_event, ParseContext};

    fn ev(json: &str) -> Event {
        parse_event(json, &ParseContext::now()).unwrap()
    }

    #[test]
    fn folds_and_skips_below_watermark() {
        let kinds = registry();
        let cart = ev(
            r#"{"event":"add_to_cart","partner_id":"p","user_id":"u","cart_amount":"10.10","category":["a","b"],"gender":"female"}"#,
        );
        let buy = ev(
            r#"{"event":"purchase","partner_id":"p","user_id":"u","cart_amount":"0.20","country":"TR"}"#,
        );
        let mut p = Profile::new(&cart, &kinds);
        assert_eq!(
            p.fold(
                &cart,
                Watermark {
                    partition: 3,
                    offset: 10
                }
            ),
            Fold::Applied
        );
        assert_eq!(
            p.fold(
                &buy,
                Watermark {
                    partition: 3,
                    offset: 11
                }
            ),
            Fold::Applied
        );
        assert_eq!(
            p.fold(
                &buy,
                Watermark {
                    partition: 3,
                    offset: 11
                }
            ),
            Fold::Skipped
        );
        assert_eq!(
            p.fold(
                &cart,
                Watermark {
                    partition: 3,
                    offset: 5
                }
            ),
            Fold::Skipped
        );
        assert_eq!(p.total_purchases.to_string(), "0.20");
        assert_eq!(p.purchase_count, 1);
        assert_eq!(p.cart_amount, Decimal::ZERO);
        assert_eq!(p.event_count, 2);
        assert_eq!(p.category, vec!["a", "b"]);

        let now = Utc::now();
        let doc = p.to_document(&kinds, now);
        assert_eq!(doc["gender_last"], json!("female"));
        assert_eq!(doc["total_purchases_minor"], json!(20));
        let back = Profile::from_document(&doc, &kinds).unwrap();
        assert_eq!(back.to_document(&kinds, now), doc);
    }

    #[test]
    fn float_free_sums() {
        let kinds = registry();
        let buy = ev(r#"{"event":"purchase","partner_id":"p","user_id":"u","cart_amount":0.1}"#);
        let mut p = Profile::new(&buy, &kinds);
        for i in 0..3 {
            p.fold(
                &buy,
                Watermark {
                    partition: 0,
                    offset: i,
                },
            );
        }
        assert_eq!(p.total_purchases.to_string(), "0.3");
    }
}
