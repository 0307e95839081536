//! Property tests: parsing never panics, and the canonical form is a fixed point.

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use pulse_core::segment::parse_segment;
use pulse_core::{parse_event, Event, ParseContext};
use serde_json::{json, Map, Value};

fn ctx() -> ParseContext {
    ParseContext {
        received_at: Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap(),
        limits: Default::default(),
    }
}

/// Arbitrary JSON values, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects that look like events: known field names with arbitrary values.
fn event_like() -> impl Strategy<Value = Value> {
    let keys = prop::sample::select(vec![
        "event",
        "partner_id",
        "user_id",
        "anonymous_id",
        "timestamp",
        "message_id",
        "category",
        "cart_amount",
        "init_session",
        "properties",
        "context",
        "country",
        "gender",
        "extra",
    ]);
    prop::collection::btree_map(keys, any_json(), 0..12)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

/// Valid events with varied optional fields.
fn valid_event() -> impl Strategy<Value = Value> {
    (
        "[a-zA-Z][a-zA-Z0-9 _-]{0,20}",
        "[a-z0-9]{1,10}",
        "\\PC{1,30}",
        prop::option::of(0i64..4_000_000_000_000),
        prop::option::of((0i64..10_000_000_000, 0u32..4)),
        prop::collection::vec("[a-zA-Z ]{1,12}", 0..5),
        prop::option::of(any::<bool>()),
        prop::option::of(prop::collection::btree_map("[a-z]{1,8}", any_json(), 0..4)),
    )
        .prop_map(|(event, partner, user, ts, amount, cats, init, props)| {
            let mut m = Map::new();
            m.insert("event".into(), json!(event));
            m.insert("partner_id".into(), json!(partner));
            m.insert("user_id".into(), json!(user));
            if let Some(ts) = ts {
                m.insert("timestamp".into(), json!(ts));
            }
            if let Some((units, scale)) = amount {
                let d = rust_decimal::Decimal::new(units, scale);
                m.insert("cart_amount".into(), json!(d.to_string()));
            }
            m.insert("category".into(), json!(cats));
            if let Some(b) = init {
                m.insert("init_session".into(), json!(b));
            }
            if let Some(p) = props {
                m.insert("properties".into(), Value::Object(p.into_iter().collect()));
            }
            Value::Object(m)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = parse_event(text, &ctx());
            let _ = parse_segment(text, None, "p", &ctx());
        }
        let _ = Event::from_canonical_json(&bytes);
    }

    #[test]
    fn never_panics_on_arbitrary_json(v in any_json()) {
        let _ = parse_event(&v.to_string(), &ctx());
        let _ = parse_segment(&v.to_string(), None, "p", &ctx());
    }

    #[test]
    fn never_panics_on_event_like_objects(v in event_like()) {
        let text = v.to_string();
        if let Ok(e) = parse_event(&text, &ctx()) {
            // Whatever was accepted has the required fields.
            prop_assert!(!e.event.is_empty() && !e.partner_id.is_empty());
            prop_assert!(e.user_id.is_some() || e.anonymous_id.is_some());
        }
        let _ = parse_segment(&text, None, "p", &ctx());
    }

    /// parse → serialise → parse gives the same event, both through the canonical reader and
    /// through the lenient parser again.
    #[test]
    fn round_trip(v in valid_event()) {
        let e = parse_event(&v.to_string(), &ctx());
        prop_assume!(e.is_ok()); // e.g. a name with no letter after normalisation
        let e = e.unwrap();
        let bytes = e.to_canonical_json();
        prop_assert_eq!(&Event::from_canonical_json(&bytes).unwrap(), &e);
        let again = parse_event(std::str::from_utf8(&bytes).unwrap(), &ctx()).unwrap();
        prop_assert_eq!(again, e);
    }
}
