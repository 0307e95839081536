//! Segment-compatible payloads (`/v1/track`, `/v1/identify`, `/v1/page`, `/v1/batch`).
//!
//! A Segment message is translated into the native field names and then goes through exactly
//! the same validation as a native event, so both paths produce identical events. The partner is
//! the one of the write key; Segment payloads have no partner field of their own.

use std::borrow::Cow;
use std::str::FromStr;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::EventError;
use crate::event::Event;
use crate::parse::{check_size, event_from_fields, FreeObject, ParseContext, RawObject};

/// The Segment call types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentCall {
    Track,
    Identify,
    Page,
    Screen,
    Alias,
    Group,
}

impl FromStr for SegmentCall {
    type Err = EventError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "track" => Self::Track,
            "identify" => Self::Identify,
            "page" => Self::Page,
            "screen" => Self::Screen,
            "alias" => Self::Alias,
            "group" => Self::Group,
            other => {
                return Err(EventError::field(
                    "type",
                    format!(
                        "unknown Segment call \"{}\" (track, identify, page, screen, alias, group)",
                        other.chars().take(32).collect::<String>()
                    ),
                ))
            }
        })
    }
}

/// Segment envelope fields that describe the delivery, not the event.
const ENVELOPE_FIELDS: &[&str] = &[
    "type",
    "sentAt",
    "receivedAt",
    "writeKey",
    "integrations",
    "version",
    "channel",
    "projectId",
    "_metadata",
];

/// Parses one Segment message for `partner_id`. `call` is the endpoint's call type; `None` for
/// `/v1/batch`, where each message states its own `type`.
pub fn parse_segment(
    json: &str,
    call: Option<SegmentCall>,
    partner_id: &str,
    ctx: &ParseContext,
) -> Result<Event, EventError> {
    check_size(json, &ctx.limits)?;
    let mut f = RawObject::parse(json, "")?;
    let stated = f.string("type", 32)?;
    let call = match (call, stated) {
        (Some(call), _) => call,
        (None, Some(t)) => t.parse()?,
        (None, None) => {
            return Err(EventError::field(
                "type",
                "required field is missing (track, identify, page, …)",
            ))
        }
    };
    let name = match call {
        SegmentCall::Track => f
            .string("event", 256)?
            .ok_or_else(|| EventError::field("event", "required field is missing"))?,
        SegmentCall::Identify => "identify".into(),
        SegmentCall::Page => "page_view".into(),
        SegmentCall::Screen => "screen_view".into(),
        SegmentCall::Alias => "alias".into(),
        SegmentCall::Group => "group".into(),
    };
    f.insert_if_absent("event", owned(&Value::String(name)));
    f.insert_if_absent("partner_id", owned(&Value::String(partner_id.to_string())));
    f.rename("userId", "user_id");
    f.rename("anonymousId", "anonymous_id");
    f.rename("messageId", "message_id");
    f.rename("originalTimestamp", "timestamp");
    f.rename("sessionId", "session_id");
    if call == SegmentCall::Page {
        f.rename("name", "page_type");
    }
    for key in ENVELOPE_FIELDS {
        f.take(key);
    }

    let context = f.free_object("context")?;
    if let Some(context) = &context {
        map_context(&mut f, &context.values);
        f.insert_if_absent("context", owned(&Value::Object(context.values.clone())));
    }

    let properties = f.free_object("properties")?;
    let traits = match f.free_object("traits")? {
        Some(t) => Some(t),
        None => context.as_ref().and_then(|c| c.nested("traits")),
    };
    let mut kept = properties
        .as_ref()
        .map(|p| p.values.clone())
        .unwrap_or_default();
    if let Some(traits) = traits {
        map_properties(&mut f, &traits);
        kept.insert("traits".into(), Value::Object(traits.values));
    }
    if let Some(properties) = &properties {
        map_properties(&mut f, properties);
    }
    if !kept.is_empty() {
        f.insert_if_absent("properties", owned(&Value::Object(kept)));
    }
    event_from_fields(f, ctx)
}

/// `context.userAgent`, `context.locale` (`tr-TR` → language `tr`, country `TR`),
/// `context.page.{url,referrer}`, `context.app.version`.
fn map_context(f: &mut RawObject<'_>, context: &Map<String, Value>) {
    if let Some(ua) = context.get("userAgent") {
        f.insert_if_absent("user_agent", owned(ua));
    }
    if let Some(Value::String(locale)) = context.get("locale") {
        let mut parts = locale.split(['-', '_']);
        if let Some(lang) = parts.next().filter(|l| !l.is_empty()) {
            f.insert_if_absent("language", owned(&Value::String(lang.to_lowercase())));
        }
        if let Some(country) = parts.next().filter(|c| c.len() == 2) {
            f.insert_if_absent("country", owned(&Value::String(country.to_uppercase())));
        }
    }
    if let Some(Value::Object(page)) = context.get("page") {
        if let Some(url) = page.get("url") {
            f.insert_if_absent("current_url", owned(url));
        }
        if let Some(referrer) = page.get("referrer") {
            f.insert_if_absent("referrer", owned(referrer));
        }
    }
    if let Some(Value::Object(app)) = context.get("app") {
        if let Some(version) = app.get("version") {
            f.insert_if_absent("version", owned(version));
        }
    }
    if let Some(Value::Object(location)) = context.get("location") {
        if let Some(country) = location.get("country") {
            f.insert_if_absent("country", owned(country));
        }
    }
}

/// Reads the e-commerce spec's property names into native fields, from the JSON text as sent
/// (a numeric `sku` keeps every digit). Properties themselves are kept whole under
/// `properties`.
fn map_properties(f: &mut RawObject<'_>, p: &FreeObject) {
    let direct = [
        ("category", "category"),
        ("categories", "category"),
        ("product_id", "product_id"),
        ("productId", "product_id"),
        ("sku", "product_id"),
        ("query", "search_query"),
        ("url", "current_url"),
        ("referrer", "referrer"),
        ("page_type", "page_type"),
        ("gender", "gender"),
        ("session_id", "session_id"),
        ("init_session", "init_session"),
        ("partner_name", "partner_name"),
        ("country", "country"),
        ("language", "language"),
    ];
    for (from, to) in direct {
        if let Some(v) = p.raw(from) {
            f.insert_if_absent(to, Cow::Owned(v.to_owned()));
        }
    }
    if f.contains("cart_amount") {
        return;
    }
    for key in ["cart_amount", "total", "revenue", "value"] {
        if let Some(v) = p.raw(key) {
            f.insert_if_absent("cart_amount", Cow::Owned(v.to_owned()));
            return;
        }
    }
    // "Product Added" carries a unit price and a quantity: the cart line is their product.
    if let Some(price) = p.values.get("price") {
        let quantity = p
            .values
            .get("quantity")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        let amount = match (price_text(price), quantity) {
            (Some(text), q) if q != 1 => rust_decimal::Decimal::from_str_exact(&text)
                .ok()
                .and_then(|d| d.checked_mul(q.into()))
                .map(|d| Value::String(d.to_string()))
                .unwrap_or_else(|| price.clone()),
            _ => price.clone(),
        };
        f.insert_if_absent("cart_amount", owned(&amount));
    }
}

fn price_text(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.trim().to_string()),
        _ => None,
    }
}

fn owned(v: &Value) -> Cow<'static, RawValue> {
    // A Value always serialises; the fallback keeps the field present (as null) regardless.
    Cow::Owned(
        serde_json::value::to_raw_value(v)
            .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use serde_json::json;

    fn ctx() -> ParseContext {
        ParseContext {
            received_at: Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap(),
            limits: Default::default(),
        }
    }

    #[test]
    fn track_product_added() {
        // Shape as sent by analytics.js 4.x.
        let payload = json!({
            "type": "track",
            "event": "Product Added",
            "userId": "u-1",
            "anonymousId": "a-1",
            "messageId": "ajs-123",
            "timestamp": "2026-11-21T09:30:00.000Z",
            "sentAt": "2026-11-21T09:30:01.000Z",
            "properties": {"product_id": "sku-9", "price": 12.5, "quantity": 2, "category": "Shoes"},
            "context": {
                "userAgent": "Mozilla/5.0",
                "locale": "tr-TR",
                "page": {"url": "https://shop.example/p/9", "referrer": "https://google.com"},
                "library": {"name": "analytics.js", "version": "4.1.0"}
            },
            "integrations": {},
            "writeKey": "k"
        });
        let e = parse_segment(&payload.to_string(), None, "shop", &ctx()).unwrap();
        assert_eq!(e.event, "add_to_cart");
        assert_eq!(e.partner_id, "shop");
        assert_eq!(e.user_id.as_deref(), Some("u-1"));
        assert_eq!(e.anonymous_id.as_deref(), Some("a-1"));
        assert_eq!(e.message_id, "ajs-123");
        assert_eq!(e.cart_amount.unwrap().to_string(), "25.0");
        assert_eq!(e.product_id.as_deref(), Some("sku-9"));
        assert_eq!(e.category, vec!["Shoes"]);
        assert_eq!(e.language.as_deref(), Some("tr"));
        assert_eq!(e.country.as_deref(), Some("TR"));
        assert_eq!(e.current_url.as_deref(), Some("https://shop.example/p/9"));
        assert_eq!(e.referrer.as_deref(), Some("https://google.com"));
        assert_eq!(e.user_agent.as_deref(), Some("Mozilla/5.0"));
        assert_eq!(e.context.unwrap()["library"]["name"], json!("analytics.js"));
        assert_eq!(e.properties.unwrap()["quantity"], json!(2));
    }

    #[test]
    fn numeric_ids_in_properties_keep_every_digit() {
        let payload = r#"{"type":"track","event":"Product Viewed","userId":18446744073709551617,
            "messageId":18446744073709551619,"properties":{"sku":18446744073709551618,"session_id":18446744073709551620}}"#;
        let e = parse_segment(payload, None, "shop", &ctx()).unwrap();
        assert_eq!(e.user_id.as_deref(), Some("18446744073709551617"));
        assert_eq!(e.message_id, "18446744073709551619");
        assert_eq!(e.product_id.as_deref(), Some("18446744073709551618"));
        assert_eq!(e.session_id.as_deref(), Some("18446744073709551620"));
    }

    #[test]
    fn order_completed_is_purchase() {
        let payload = json!({"event": "Order Completed", "userId": "u", "properties": {"total": "99.90", "revenue": 90}});
        let e = parse_segment(
            &payload.to_string(),
            Some(SegmentCall::Track),
            "shop",
            &ctx(),
        )
        .unwrap();
        assert_eq!(e.event, "purchase");
        assert_eq!(e.cart_amount.unwrap().to_string(), "99.90");
    }

    #[test]
    fn identify_and_page() {
        let payload = json!({"userId": "u", "traits": {"gender": "Female", "email": "x@y"}});
        let e = parse_segment(
            &payload.to_string(),
            Some(SegmentCall::Identify),
            "shop",
            &ctx(),
        )
        .unwrap();
        assert_eq!(e.event, "identify");
        assert_eq!(e.gender.as_deref(), Some("female"));
        assert_eq!(e.properties.unwrap()["traits"]["email"], json!("x@y"));

        let payload = json!({"anonymousId": "a", "name": "Home", "properties": {"url": "https://s/", "referrer": "r"}});
        let e = parse_segment(
            &payload.to_string(),
            Some(SegmentCall::Page),
            "shop",
            &ctx(),
        )
        .unwrap();
        assert_eq!(e.event, "page_view");
        assert_eq!(e.page_type.as_deref(), Some("Home"));
        assert_eq!(e.current_url.as_deref(), Some("https://s/"));
    }

    #[test]
    fn batch_item_needs_type() {
        let e = parse_segment(r#"{"userId":"u","event":"x"}"#, None, "shop", &ctx()).unwrap_err();
        assert!(e.to_string().starts_with("type: required"), "{e}");
        let e = parse_segment(r#"{"type":"boom","userId":"u"}"#, None, "shop", &ctx()).unwrap_err();
        assert!(
            e.to_string().starts_with("type: unknown Segment call"),
            "{e}"
        );
    }

    #[test]
    fn track_needs_event_and_user() {
        let e =
            parse_segment(r#"{"userId":"u"}"#, Some(SegmentCall::Track), "s", &ctx()).unwrap_err();
        assert_eq!(e.to_string(), "event: required field is missing");
        let e =
            parse_segment(r#"{"event":"x"}"#, Some(SegmentCall::Track), "s", &ctx()).unwrap_err();
        assert!(e.to_string().starts_with("user_id: required"), "{e}");
    }
}
