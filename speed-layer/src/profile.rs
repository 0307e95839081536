//! One user's live profile: folding events in, and the Elasticsearch document it is kept as.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use pulse_core::Event;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::client_context::ClientContext;
use crate::counts::NamedCounts;
use crate::dedupe::{DedupePolicy, MessageDigest, RecentMessages};
use crate::identity::Identity;
use crate::interned::{intern, Shared};
use crate::models::{ModelKind, ModelStates};

/// Distinct categories kept per profile, most recent first.
pub const MAX_CATEGORIES: usize = 20;

/// Distinct event types of a partner's own (not in `STANDARD_EVENT_TYPES`) counted per
/// profile; further ones are counted under [`OTHER_EVENTS`]. A partner that sends thousands
/// of names grows no document without bound, and the standard types, always counted by name,
/// cannot be crowded out of `event_counts` and `event_types` by them.
pub const MAX_EVENT_TYPES: usize = 100;

fn is_standard(event_type: &str) -> bool {
    pulse_core::names::STANDARD_EVENT_TYPES.contains(&event_type)
}

/// The `event_counts` key of types beyond [`MAX_EVENT_TYPES`]. Not a valid event type (those
/// start with a letter), so it never collides with one.
pub const OTHER_EVENTS: &str = "_other";

/// Where in the topic the last event folded into a profile came from. Events at or below it are
/// already in the profile and are skipped when re-read after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub partition: i32,
    pub offset: i64,
}

/// The profile of `{partner_id}:{user}`.
///
/// Held by the million in the speed layer's memory, so held compactly: the id once (the
/// partner and user are its two halves), values many profiles share (user agents, countries,
/// categories…) as [`Shared`] pointers to one copy, the model states in a short list. The
/// `profile-bytes` bench counts what one costs.
#[derive(Debug, Clone)]
pub struct Profile {
    /// `{partner_id}:{user}`; partner ids never contain ':'.
    id: Box<str>,
    pub anonymous: bool,
    /// Unique to a visit, so not shared.
    pub session_id: Option<Box<str>>,
    /// Partner name, country, version, language, referrer, user agent: shared.
    pub client: Option<Arc<ClientContext>>,
    /// Epoch seconds of the newest event.
    pub last_visit: i64,
    /// Epoch seconds of the oldest event.
    pub first_seen: i64,
    pub category: Vec<Shared>,
    /// Exact sum of purchase amounts.
    pub total_purchases: Decimal,
    pub purchase_count: u64,
    /// The open cart: add_to_cart adds, remove_from_cart subtracts, purchase empties it.
    pub cart_amount: Decimal,
    pub event_count: u64,
    pub event_counts: NamedCounts,
    pub watermark: Option<Watermark>,
    /// Message ids folded recently: a client retry of one of them is not folded again.
    pub recent: RecentMessages,
    /// Model name → state, for the models enabled.
    pub models: ModelStates,
    /// Links to other profiles of the same person (see [`crate::identity`]); boxed and absent
    /// for the many profiles that never took part in one.
    pub identity: Option<Box<Identity>>,
}

/// What folding one record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fold {
    Applied,
    /// At or below the watermark: already in the profile.
    Skipped,
    /// A message id the profile folded already: a client's retry, not a new event.
    Duplicate,
    /// The event cannot be folded (a sum would leave the amount range); the profile is
    /// unchanged and the record is dead-lettered with this reason.
    Refused(String),
}

impl Profile {
    pub fn new(event: &Event, models: &[ModelKind]) -> Self {
        Self::new_for(event, event.person_id(), models)
    }

    /// The profile of `person` whose first event is `event`: the event's own id, or the
    /// person an event of a merged device was forwarded to.
    pub fn new_for(event: &Event, person: &str, models: &[ModelKind]) -> Self {
        let ts = event.timestamp.timestamp();
        let mut profile = Self::empty(&event.partner_id, person, models);
        profile.anonymous = event.user_id.is_none();
        profile.last_visit = ts;
        profile.first_seen = ts;
        profile
    }

    /// A profile with no event yet: what a merge lands in when its person has no document
    /// (its first event was folded by a replica that crashed before writing it, and the
    /// merge record is read before that event is read again: it never is, the event comes
    /// first in the partition, but the merge must not depend on it).
    pub fn empty(partner_id: &str, person: &str, models: &[ModelKind]) -> Self {
        Self::with_id(
            pulse_core::event::partition_key(partner_id, person).into(),
            models,
        )
    }

    fn with_id(id: Box<str>, models: &[ModelKind]) -> Self {
        Self {
            id,
            anonymous: false,
            session_id: None,
            client: None,
            last_visit: 0,
            first_seen: 0,
            category: Vec::new(),
            total_purchases: Decimal::ZERO,
            purchase_count: 0,
            cart_amount: Decimal::ZERO,
            event_count: 0,
            event_counts: NamedCounts::default(),
            watermark: None,
            recent: RecentMessages::default(),
            models: models.iter().map(|k| k.fresh()).collect(),
            identity: None,
        }
    }

    /// The anonymous profile `{partner}:{anonymous_id}` merged into `person` by the link read
    /// at `at`: a pointer with no state of its own (the state went to the person). Its
    /// document is what tells a re-read, a second person and the profile API where the
    /// device belongs.
    pub fn merged_stub(
        partner_id: &str,
        anonymous_id: &str,
        person: &str,
        merged_at_ms: i64,
        at: Watermark,
    ) -> Self {
        let mut stub = Self::empty(partner_id, anonymous_id, &[]);
        stub.anonymous = true;
        stub.watermark = Some(at);
        stub.identity = Some(Box::new(Identity {
            merged_into: Some(person.to_string()),
            merged_at: Some(merged_at_ms),
            ..Identity::default()
        }));
        stub
    }

    /// `{partner_id}:{user}`: the document's `_id` and the Kafka key of the user's events.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn partner_id(&self) -> &str {
        self.id.split_once(':').map_or("", |(partner, _)| partner)
    }

    /// The user (or anonymous) id.
    pub fn user_id(&self) -> &str {
        pulse_core::event::person_of(&self.id)
    }

    /// The person this profile was merged into, if it was.
    pub fn merged_into(&self) -> Option<&str> {
        self.identity.as_ref()?.merged_into.as_deref()
    }

    /// Whether the record read at `at` is already in the profile (at or below its watermark).
    pub fn covers(&self, at: Watermark) -> bool {
        self.watermark
            .is_some_and(|w| w.partition == at.partition && at.offset <= w.offset)
    }

    /// The identity part, created on first use.
    pub fn identity_mut(&mut self) -> &mut Identity {
        self.identity.get_or_insert_with(Box::default)
    }

    /// Takes in `other`, the profile of an anonymous device of this person, as if this
    /// profile had folded its events too: counts and sums added (exactly; refused, with
    /// nothing changed, if a sum would leave the range), `first_seen` the earlier and
    /// `last_visit` the later, the latest values and the recent categories of whichever was
    /// seen last first, the open carts added, the recent message ids united, every model's
    /// state merged. Event types beyond the cap of own types count under [`OTHER_EVENTS`].
    pub fn merge(&mut self, other: &Profile, dedupe: &DedupePolicy) -> Result<(), String> {
        let total = self
            .total_purchases
            .checked_add(other.total_purchases)
            .filter(|d| minor_units(*d).is_some());
        let cart = self
            .cart_amount
            .checked_add(other.cart_amount)
            .filter(|d| minor_units(*d).is_some());
        let (Some(total), Some(cart)) = (total, cart) else {
            return Err(format!(
                "merging {}: total_purchases {} + {} or cart_amount {} + {} leaves the range a profile sums exactly (±{})",
                other.id,
                self.total_purchases,
                other.total_purchases,
                self.cart_amount,
                other.cart_amount,
                max_profile_sum()
            ));
        };
        if other.event_count == 0 {
            return Ok(());
        }
        let other_is_newer = self.event_count == 0 || other.last_visit > self.last_visit;
        self.total_purchases = total;
        self.cart_amount = cart;
        self.purchase_count = self.purchase_count.saturating_add(other.purchase_count);
        if self.event_count == 0 {
            (self.first_seen, self.last_visit) = (other.first_seen, other.last_visit);
        } else {
            self.first_seen = self.first_seen.min(other.first_seen);
            self.last_visit = self.last_visit.max(other.last_visit);
        }
        self.event_count = self.event_count.saturating_add(other.event_count);
        for (kind, n) in other.event_counts.iter() {
            let counted = if self.event_counts.contains(kind)
                || is_standard(kind)
                || (kind != OTHER_EVENTS && self.own_types() < MAX_EVENT_TYPES)
            {
                kind
            } else {
                OTHER_EVENTS
            };
            self.event_counts.add(counted, n);
        }
        fn take<T: Clone>(slot: &mut Option<T>, theirs: &Option<T>, newer: bool) {
            if theirs.is_some() && (newer || slot.is_none()) {
                slot.clone_from(theirs);
            }
        }
        take(&mut self.session_id, &other.session_id, other_is_newer);
        self.client =
            ClientContext::merged(self.client.as_ref(), other.client.as_ref(), other_is_newer);
        let (first, second) = if other_is_newer {
            (&other.category, &self.category)
        } else {
            (&self.category, &other.category)
        };
        let mut category = first.clone();
        for c in second {
            if !category.contains(c) {
                category.push(c.clone());
            }
        }
        category.truncate(MAX_CATEGORIES);
        self.category = category;
        self.recent.merge(&other.recent, dedupe);
        for model in self.models.iter_mut() {
            let name = model.name();
            if let Some(theirs) = other.models.get(name) {
                if let Err(e) = model.merge(theirs, other_is_newer) {
                    tracing::warn!(model = name, error = %e, "model state not merged");
                }
            }
        }
        Ok(())
    }

    /// Folds the event read at `at`, unless the profile already contains it (by offset or
    /// by message id) or cannot hold it. Nothing changes unless the answer is `Applied`.
    pub fn fold(&mut self, event: &Event, at: Watermark, dedupe: &DedupePolicy) -> Fold {
        // A merged device's pointer holds no state: its events are its person's (the live
        // layer forwards them before they get here).
        if self.covers(at) || self.merged_into().is_some() {
            return Fold::Skipped;
        }
        let digest = MessageDigest::of(&event.message_id);
        if self.recent.contains(digest) {
            return Fold::Duplicate;
        }
        // Sums first, checked, before anything changes: a refused event leaves no trace.
        let (total_purchases, cart_amount) = match self.amounts_after(event) {
            Ok(amounts) => amounts,
            Err(reason) => return Fold::Refused(reason),
        };
        self.total_purchases = total_purchases;
        self.cart_amount = cart_amount;
        if event.event == "purchase" {
            self.purchase_count = self.purchase_count.saturating_add(1);
        }
        self.watermark = Some(at);
        self.recent
            .insert(digest, event.received_at.timestamp_millis(), dedupe);
        let ts = event.timestamp.timestamp();
        self.last_visit = self.last_visit.max(ts);
        self.first_seen = self.first_seen.min(ts);
        self.event_count = self.event_count.saturating_add(1);
        if event.user_id.is_some() {
            // A profile that folds events of a user id is a person, never merged into another.
            self.anonymous = false;
        }
        let counted = if self.event_counts.contains(&event.event)
            || is_standard(&event.event)
            || self.own_types() < MAX_EVENT_TYPES
        {
            event.event.as_str()
        } else {
            OTHER_EVENTS
        };
        self.event_counts.add(counted, 1);
        if let Some(session) = &event.session_id {
            if self.session_id.as_deref() != Some(session.as_str()) {
                self.session_id = Some(session.as_str().into());
            }
        }
        if let Some(client) = ClientContext::after(self.client.as_ref(), event) {
            self.client = Some(client);
        }
        for c in event.category.iter().rev() {
            // Most recent first: a known category moves to the front, a new one comes in
            // shared and pushes the oldest out beyond the cap.
            match self.category.iter().position(|x| **x == **c) {
                Some(i) => self.category[..=i].rotate_right(1),
                None => {
                    if self.category.len() >= MAX_CATEGORIES {
                        self.category.truncate(MAX_CATEGORIES - 1);
                    }
                    self.category.insert(0, intern(c));
                }
            }
        }
        for model in self.models.iter_mut() {
            model.fold(event);
        }
        Fold::Applied
    }

    /// `(total_purchases, cart_amount)` after the event, or why they cannot hold it: every sum
    /// must stay exact in `i64` hundredths (the `total_purchases_minor` field portals sum).
    fn amounts_after(&self, event: &Event) -> Result<(Decimal, Decimal), String> {
        let amount = event.cart_amount.unwrap_or_default();
        let checked = |field: &str, from: Decimal, result: Option<Decimal>| {
            result.filter(|d| minor_units(*d).is_some()).ok_or_else(|| {
                format!(
                    "cart_amount: {field} {from} with {amount} leaves the range a profile sums exactly (±{})",
                    max_profile_sum()
                )
            })
        };
        let total = self.total_purchases;
        let cart = self.cart_amount;
        Ok(match event.event.as_str() {
            "purchase" => (
                checked("total_purchases", total, total.checked_add(amount))?,
                Decimal::ZERO,
            ),
            "add_to_cart" => (
                total,
                checked("cart_amount", cart, cart.checked_add(amount))?,
            ),
            "remove_from_cart" => (
                total,
                checked("cart_amount", cart, cart.checked_sub(amount))?.max(Decimal::ZERO),
            ),
            _ => (total, cart),
        })
    }

    /// The Elasticsearch document. Amounts are exact decimal strings in `_source` (mapped as
    /// `double` for range queries) plus exact integer minor units for sums.
    /// How many of the partner's own types (not standard, not [`OTHER_EVENTS`]) are counted.
    fn own_types(&self) -> usize {
        self.event_counts
            .names()
            .filter(|k| *k != OTHER_EVENTS && !is_standard(k))
            .count()
    }

    pub fn to_document(&self, kinds: &[ModelKind], now: DateTime<Utc>) -> Value {
        if let Some(person) = self.merged_into() {
            // A pointer, not a person: no counts, sums or times, so a portal query that
            // forgets to leave merged devices out still sums and ranges over people only.
            return json!({
                "profile_id": self.id(),
                "partner_id": self.partner_id(),
                "user_id": self.user_id(),
                "anonymous": self.anonymous,
                "merged_into": person,
                "identity": self.identity,
                "watermark": self.watermark,
                "updated_at": now.timestamp_millis(),
            });
        }
        let mut doc = json!({
            "profile_id": self.id(),
            "partner_id": self.partner_id(),
            "user_id": self.user_id(),
            "anonymous": self.anonymous,
            "last_visit": self.last_visit,
            "first_seen": self.first_seen,
            "category": self.category.iter().map(|c| &**c).collect::<Vec<_>>(),
            "total_purchases": self.total_purchases.normalize().to_string(),
            "total_purchases_minor": minor_units(self.total_purchases).unwrap_or(i64::MAX),
            "purchase_count": self.purchase_count,
            "cart_amount": self.cart_amount.normalize().to_string(),
            "event_count": self.event_count,
            "event_counts": self.event_counts,
            "event_types": self.event_counts.names().filter(|k| *k != OTHER_EVENTS).collect::<Vec<_>>(),
            "watermark": self.watermark,
            "dedupe": self.recent.to_json(),
            "updated_at": now.timestamp_millis(),
        });
        let obj = doc.as_object_mut().expect("json! object");
        if let Some(session) = &self.session_id {
            obj.insert("session_id".into(), json!(session));
        }
        for (k, v) in self.client.iter().flat_map(|c| c.fields()) {
            obj.insert(k.into(), json!(v));
        }
        let mut states = Map::new();
        for kind in kinds {
            if let Some(model) = self.models.get(kind.name) {
                obj.insert(kind.field.into(), json!(model.answer(now)));
                states.insert(kind.name.into(), model.to_json());
            }
        }
        obj.insert("models".into(), Value::Object(states));
        if let Some(identity) = &self.identity {
            if !identity.aliases.is_empty() {
                obj.insert("aliases".into(), json!(identity.aliases));
            }
            obj.insert("identity".into(), json!(identity));
        }
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
        let id: Box<str> = s("profile_id").ok_or("profile_id missing")?.into();
        if !id.contains(':') {
            return Err(format!("profile_id {id:?} is not {{partner_id}}:{{user}}"));
        }
        let stored_models = doc.get("models").and_then(Value::as_object);
        let identity = match doc.get("identity") {
            Some(v) => {
                let mut identity = serde_json::from_value::<Identity>(v.clone())
                    .map_err(|e| format!("identity: {e}"))?;
                identity.aliases = doc
                    .get("aliases")
                    .and_then(|a| serde_json::from_value(a.clone()).ok())
                    .unwrap_or_default();
                identity.merged_into = s("merged_into");
                Some(Box::new(identity))
            }
            None => None,
        };
        if identity.as_ref().is_some_and(|i| i.merged_into.is_some()) {
            let mut stub = Self::with_id(id, &[]);
            stub.anonymous = true;
            stub.watermark = doc
                .get("watermark")
                .and_then(|v| serde_json::from_value(v.clone()).ok());
            stub.identity = identity;
            return Ok(stub);
        }
        Ok(Self {
            id,
            anonymous: doc
                .get("anonymous")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            session_id: s("session_id").map(Into::into),
            client: ClientContext::stored(|f| doc.get(f).and_then(Value::as_str)),
            last_visit: n("last_visit"),
            first_seen: n("first_seen"),
            category: doc
                .get("category")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str().map(intern)).collect())
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
            recent: RecentMessages::from_json(doc.get("dedupe")),
            models: kinds
                .iter()
                .map(|k| {
                    let state = stored_models.and_then(|m| m.get(k.name)).cloned();
                    state.map_or_else(|| k.fresh(), |s| k.load(s))
                })
                .collect(),
            identity,
        })
    }
}

/// Hundredths, for integer sums in aggregations. Exact for amounts with at most two decimals;
/// finer amounts are rounded half-even here only (the decimal string stays exact). `None`
/// when the amount is beyond what an `i64` of hundredths holds.
fn minor_units(amount: Decimal) -> Option<i64> {
    use rust_decimal::prelude::ToPrimitive;
    amount.checked_mul(Decimal::ONE_HUNDRED)?.round().to_i64()
}

/// The largest sum a profile holds: `i64::MAX` hundredths.
fn max_profile_sum() -> Decimal {
    Decimal::from(i64::MAX) / Decimal::ONE_HUNDRED
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::registry;
    use pulse_core::{parse_event, ParseContext};

    fn ev(json: &str) -> Event {
        parse_event(json, &ParseContext::now()).unwrap()
    }

    fn at(partition: i32, offset: i64) -> Watermark {
        Watermark { partition, offset }
    }

    #[test]
    fn folds_and_skips_below_watermark() {
        let kinds = registry();
        let d = DedupePolicy::default();
        let cart = ev(
            r#"{"event":"add_to_cart","partner_id":"p","user_id":"u","cart_amount":"10.10","category":["a","b"],"gender":"female"}"#,
        );
        let buy = ev(
            r#"{"event":"purchase","partner_id":"p","user_id":"u","cart_amount":"0.20","country":"TR"}"#,
        );
        let mut p = Profile::new(&cart, &kinds);
        assert_eq!(p.fold(&cart, at(3, 10), &d), Fold::Applied);
        assert_eq!(p.fold(&buy, at(3, 11), &d), Fold::Applied);
        assert_eq!(p.fold(&buy, at(3, 11), &d), Fold::Skipped);
        assert_eq!(p.fold(&cart, at(3, 5), &d), Fold::Skipped);
        assert_eq!(p.total_purchases.to_string(), "0.20");
        assert_eq!(p.purchase_count, 1);
        assert_eq!(p.cart_amount, Decimal::ZERO);
        assert_eq!(p.event_count, 2);
        assert_eq!(
            p.category.iter().map(|c| &**c).collect::<Vec<_>>(),
            ["a", "b"]
        );

        let now = Utc::now();
        let doc = p.to_document(&kinds, now);
        assert_eq!(doc["gender_last"], json!("female"));
        assert_eq!(doc["total_purchases_minor"], json!(20));
        assert_eq!(doc["event_types"], json!(["add_to_cart", "purchase"]));
        let back = Profile::from_document(&doc, &kinds).unwrap();
        assert_eq!(back.to_document(&kinds, now), doc);
    }

    #[test]
    fn a_retried_message_id_is_folded_once_also_after_reload() {
        let kinds = registry();
        let d = DedupePolicy::default();
        let buy = ev(
            r#"{"event":"purchase","partner_id":"p","user_id":"u","cart_amount":"5","message_id":"order-1"}"#,
        );
        let mut p = Profile::new(&buy, &kinds);
        assert_eq!(p.fold(&buy, at(0, 1), &d), Fold::Applied);
        // The same message at a later offset: a client retry.
        assert_eq!(p.fold(&buy, at(0, 2), &d), Fold::Duplicate);
        let mut back = Profile::from_document(&p.to_document(&kinds, Utc::now()), &kinds).unwrap();
        assert_eq!(back.fold(&buy, at(0, 3), &d), Fold::Duplicate);
        assert_eq!(back.total_purchases.to_string(), "5");
        assert_eq!(back.purchase_count, 1);
        // Only the profile's own ids count: the same id elsewhere is a different event.
        let other = ev(
            r#"{"event":"purchase","partner_id":"q","user_id":"u","cart_amount":"5","message_id":"order-1"}"#,
        );
        let mut q = Profile::new(&other, &kinds);
        assert_eq!(q.fold(&other, at(0, 4), &d), Fold::Applied);
    }

    #[test]
    fn sums_that_leave_the_range_are_refused_without_a_trace() {
        let kinds = registry();
        let d = DedupePolicy::default();
        let big = |id: &str| {
            ev(&format!(
                r#"{{"event":"purchase","partner_id":"p","user_id":"u","cart_amount":"1000000000000","message_id":"{id}"}}"#
            ))
        };
        let mut p = Profile::new(&big("0"), &kinds);
        p.total_purchases = max_profile_sum() - Decimal::from(10);
        let before = p.to_document(&kinds, Utc::now());
        match p.fold(&big("1"), at(0, 1), &d) {
            Fold::Refused(reason) => assert!(
                reason.starts_with("cart_amount: total_purchases"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        let after = p.to_document(&kinds, Utc::now());
        assert_eq!(after["total_purchases"], before["total_purchases"]);
        assert_eq!(after["watermark"], before["watermark"]);
        assert_eq!(after["event_count"], before["event_count"]);
        // Far below the bound, the same event folds.
        let mut q = Profile::new(&big("2"), &kinds);
        assert_eq!(q.fold(&big("2"), at(0, 2), &d), Fold::Applied);
    }

    #[test]
    fn event_types_beyond_the_cap_count_as_other() {
        let kinds = registry();
        let d = DedupePolicy::default();
        let first = ev(r#"{"event":"t0","partner_id":"p","user_id":"u"}"#);
        let mut p = Profile::new(&first, &kinds);
        for i in 0..(MAX_EVENT_TYPES + 50) {
            let e = ev(&format!(
                r#"{{"event":"t{i}","partner_id":"p","user_id":"u"}}"#
            ));
            assert_eq!(p.fold(&e, at(0, i as i64), &d), Fold::Applied);
        }
        assert_eq!(p.event_counts.len(), MAX_EVENT_TYPES + 1);
        assert_eq!(p.event_counts.get(OTHER_EVENTS), Some(50));
        assert_eq!(p.event_count, (MAX_EVENT_TYPES + 50) as u64);
        // Past the cap, a standard type is still counted and listed by name.
        let buy = ev(r#"{"event":"purchase","partner_id":"p","user_id":"u","message_id":"b1"}"#);
        assert_eq!(p.fold(&buy, at(0, 10_000), &d), Fold::Applied);
        assert_eq!(p.event_counts.get("purchase"), Some(1));
        let doc = p.to_document(&kinds, chrono::Utc::now());
        let types = doc["event_types"].as_array().unwrap();
        assert!(types.contains(&json!("purchase")));
        assert_eq!(
            types.len(),
            MAX_EVENT_TYPES + 1,
            "100 own types and purchase"
        );
        assert!(!types.contains(&json!(OTHER_EVENTS)));
    }

    #[test]
    fn a_merge_adds_what_both_profiles_folded() {
        let kinds = registry();
        let d = DedupePolicy::default();
        let at_ts = |t: &str, json: &str| ev(&json.replace("TS", t));
        // The device, browsed anonymously on the 1st and 3rd; the person, on the 2nd.
        let a1 = at_ts(
            "2026-11-01T10:00:00Z",
            r#"{"event":"product_view","partner_id":"p","anonymous_id":"a","category":["shoes"],"gender":"female","country":"TR","message_id":"a1","timestamp":"TS"}"#,
        );
        let a2 = at_ts(
            "2026-11-03T10:00:00Z",
            r#"{"event":"add_to_cart","partner_id":"p","anonymous_id":"a","cart_amount":"19.90","category":["bags"],"gender":"female","message_id":"a2","timestamp":"TS"}"#,
        );
        let u1 = at_ts(
            "2026-11-02T10:00:00Z",
            r#"{"event":"purchase","partner_id":"p","user_id":"u","cart_amount":"5.05","category":["hats"],"country":"GB","gender":"male","message_id":"u1","timestamp":"TS"}"#,
        );
        let u2 = at_ts(
            "2026-11-02T11:00:00Z",
            r#"{"event":"add_to_cart","partner_id":"p","user_id":"u","cart_amount":"1.10","gender":"male","message_id":"u2","timestamp":"TS"}"#,
        );
        let mut device = Profile::new(&a1, &kinds);
        assert!(device.anonymous);
        device.fold(&a1, at(1, 1), &d);
        device.fold(&a2, at(1, 2), &d);
        let mut person = Profile::new(&u1, &kinds);
        person.fold(&u1, at(2, 1), &d);
        person.fold(&u2, at(2, 2), &d);
        assert!(!person.anonymous);
        person.merge(&device, &d).unwrap();
        assert_eq!(person.event_count, 4);
        assert_eq!(person.event_counts.get("add_to_cart"), Some(2));
        assert_eq!(person.event_counts.get("product_view"), Some(1));
        assert_eq!(person.total_purchases.to_string(), "5.05");
        assert_eq!(person.cart_amount.to_string(), "21.00", "both open carts");
        assert_eq!(person.purchase_count, 1);
        assert_eq!(person.first_seen, a1.timestamp.timestamp());
        assert_eq!(person.last_visit, a2.timestamp.timestamp());
        // The device was seen last: its latest values and categories come first.
        assert_eq!(
            person.client.as_ref().and_then(|c| c.get("country")),
            Some("TR")
        );
        assert_eq!(
            person.category.iter().map(|c| &**c).collect::<Vec<_>>(),
            ["bags", "shoes", "hats"]
        );
        assert!(person.recent.contains(MessageDigest::of("a2")));
        assert!(person.recent.contains(MessageDigest::of("u1")));
        let doc = person.to_document(&kinds, a2.timestamp);
        assert_eq!(doc["gender_last"], json!("female"));
        // MODEL2: female 2 (a1, a2) against male 1 (u2; a purchase is not a visit).
        assert_eq!(doc["gender_top"], json!("female"));
        // A retry of a device's event after the merge is recognised.
        assert_eq!(person.fold(&a2, at(2, 9), &d), Fold::Duplicate);
        // The watermark stays the person's own.
        assert_eq!(person.watermark, Some(at(2, 2)));
    }

    #[test]
    fn a_merge_whose_sums_leave_the_range_changes_nothing() {
        let kinds = registry();
        let d = DedupePolicy::default();
        let buy = ev(r#"{"event":"purchase","partner_id":"p","user_id":"u","cart_amount":"1"}"#);
        let mut person = Profile::new(&buy, &kinds);
        person.fold(&buy, at(0, 1), &d);
        person.total_purchases = max_profile_sum();
        let mut device = Profile::new(&buy, &kinds);
        device.fold(&buy, at(1, 1), &d);
        let before = person.to_document(&kinds, Utc::now());
        let err = person.merge(&device, &d).unwrap_err();
        assert!(err.contains("leaves the range"), "{err}");
        assert_eq!(
            person.to_document(&kinds, Utc::now())["event_count"],
            before["event_count"]
        );
    }

    #[test]
    fn a_merged_device_is_stored_as_a_pointer_and_read_back_as_one() {
        let kinds = registry();
        let stub = Profile::merged_stub("p", "a", "u", 1_700_000_000_000, at(4, 7));
        let doc = stub.to_document(&kinds, Utc::now());
        assert_eq!(doc["merged_into"], json!("u"));
        assert_eq!(doc["user_id"], json!("a"));
        for absent in [
            "last_visit",
            "total_purchases",
            "event_count",
            "event_types",
        ] {
            assert!(doc.get(absent).is_none(), "{absent} in {doc}");
        }
        let back = Profile::from_document(&doc, &kinds).unwrap();
        assert_eq!(back.merged_into(), Some("u"));
        assert!(back.covers(at(4, 7)) && !back.covers(at(4, 8)));
        assert_eq!(
            back.to_document(&kinds, Utc::now())["identity"],
            doc["identity"]
        );
        // A person's aliases are a keyword list of the document.
        let buy = ev(r#"{"event":"purchase","partner_id":"p","user_id":"u"}"#);
        let mut person = Profile::new(&buy, &kinds);
        person.identity_mut().merged("a");
        let doc = person.to_document(&kinds, Utc::now());
        assert_eq!(doc["aliases"], json!(["a"]));
        let back = Profile::from_document(&doc, &kinds).unwrap();
        assert_eq!(back.identity.unwrap().aliases, vec!["a"]);
    }

    #[test]
    fn float_free_sums() {
        let kinds = registry();
        let d = DedupePolicy::default();
        let buy = |i: i64| {
            ev(&format!(
                r#"{{"event":"purchase","partner_id":"p","user_id":"u","cart_amount":0.1,"message_id":"m{i}"}}"#
            ))
        };
        let mut p = Profile::new(&buy(0), &kinds);
        for i in 0..3 {
            assert_eq!(p.fold(&buy(i), at(0, i), &d), Fold::Applied);
        }
        assert_eq!(p.total_purchases.to_string(), "0.3");
    }
}
