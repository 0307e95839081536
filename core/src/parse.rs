//! Parsing and validating a native Pulse event (the form of ARCHITECTURE.md).
//!
//! The top-level object is split into raw JSON values first and each known field is then read
//! with its own rules. Two reasons: amounts keep their exact decimal text (a float would drift),
//! and every error names the field it comes from.

use std::borrow::Cow;
use std::str::FromStr;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use rust_decimal::Decimal;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::EventError;
use crate::event::Event;
use crate::limits::Limits;
use crate::names::normalize_event_name;
use crate::validate::{
    check_amount_as_sent, check_canonical, MAX_MESSAGE_ID, MAX_PARTNER_ID, MAX_USER_ID,
};

/// What parsing needs from the request around the event.
#[derive(Debug, Clone, Copy)]
pub struct ParseContext {
    /// Stamped as `received_at`, and used as `timestamp` when the client sent none.
    pub received_at: DateTime<Utc>,
    pub limits: Limits,
}

impl ParseContext {
    pub fn now() -> Self {
        Self {
            received_at: Utc::now(),
            limits: Limits::default(),
        }
    }
}

/// Fields of the native form. Anything else at the top level is kept under `properties`.
const NATIVE_FIELDS: &[&str] = &[
    "event",
    "partner_id",
    "user_id",
    "anonymous_id",
    "timestamp",
    "message_id",
    "session_id",
    "partner_name",
    "country",
    "language",
    "version",
    "user_agent",
    "referrer",
    "current_url",
    "page_type",
    "category",
    "search_query",
    "product_id",
    "cart_amount",
    "gender",
    "init_session",
    "properties",
    "context",
    "received_at",
];

use crate::limits::{MAX_YEAR, MIN_YEAR};

/// Parses one native event from its JSON text.
pub fn parse_event(json: &str, ctx: &ParseContext) -> Result<Event, EventError> {
    check_size(json, &ctx.limits)?;
    let object = RawObject::parse(json, "")?;
    event_from_fields(object, ctx)
}

/// Refuses an event larger than the limit before any parsing work is spent on it.
pub(crate) fn check_size(json: &str, limits: &Limits) -> Result<(), EventError> {
    if json.len() > limits.max_event_bytes {
        return Err(EventError::whole(format!(
            "event is {} bytes; the limit is {} bytes",
            json.len(),
            limits.max_event_bytes
        )));
    }
    Ok(())
}

/// Builds an event from a field map. Shared by the native form and the Segment mapping, which
/// translates Segment's names into native ones first.
pub(crate) fn event_from_fields(
    mut f: RawObject<'_>,
    ctx: &ParseContext,
) -> Result<Event, EventError> {
    let max = ctx.limits.max_string_chars;
    let event_raw = f
        .string("event", max)?
        .ok_or_else(|| EventError::field("event", "required field is missing"))?;
    let event = normalize_event_name(&event_raw).ok_or_else(|| {
        EventError::field(
            "event",
            format!(
                "\"{}\" is not a usable event name (letters, digits and separators, starting with a letter, at most 64 characters)",
                event_raw.chars().take(64).collect::<String>()
            ),
        )
    })?;
    let partner_id = f
        .string("partner_id", MAX_PARTNER_ID)?
        .ok_or_else(|| EventError::field("partner_id", "required field is missing"))?;
    // The ':' rule and "user_id or anonymous_id" are checked with the others, in
    // `check_canonical` below, which every consumer applies too.
    let user_id = f.string("user_id", MAX_USER_ID)?;
    let anonymous_id = f.string("anonymous_id", MAX_USER_ID)?;
    let timestamp = f.timestamp("timestamp")?.unwrap_or(ctx.received_at);
    let latest = ctx.received_at + chrono::Duration::seconds(i64::from(ctx.limits.max_future_secs));
    if timestamp > latest {
        return Err(EventError::field(
            "timestamp",
            format!(
                "{} is more than {} s ahead of the time it was received ({}); check the client's clock",
                timestamp.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                ctx.limits.max_future_secs,
                ctx.received_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ),
        ));
    }
    let message_id = f
        .string("message_id", MAX_MESSAGE_ID)?
        .unwrap_or_else(|| Uuid::new_v4().to_string());
    // The receive time is ingest's to state, never the client's.
    f.take("received_at");

    let mut event = Event {
        message_id,
        event,
        partner_id,
        user_id,
        anonymous_id,
        timestamp,
        received_at: truncate_to_millis(ctx.received_at),
        session_id: f.string("session_id", 256)?,
        partner_name: f.string("partner_name", 256)?,
        country: f.string("country", 64)?.map(normalize_country),
        language: f.string("language", 64)?,
        version: f.string("version", 64)?,
        user_agent: f.string("user_agent", max)?,
        referrer: f.string("referrer", max)?,
        current_url: f.string("current_url", max)?,
        page_type: f.string("page_type", 256)?,
        category: f.categories("category", ctx.limits.max_categories)?,
        search_query: f.string("search_query", 1024)?,
        product_id: f.string("product_id", 256)?,
        cart_amount: f.decimal("cart_amount")?,
        gender: f.string("gender", 64)?.map(|g| g.to_lowercase()),
        init_session: f.boolean("init_session")?,
        properties: f.object("properties")?,
        context: f.object("context")?,
    };
    let unknown = f.into_rest()?;
    if !unknown.is_empty() {
        let properties = event.properties.get_or_insert_with(Map::new);
        for (k, v) in unknown {
            properties.entry(k).or_insert(v);
        }
    }
    // The checks every consumer applies again: what ingest accepts, they can fold.
    check_canonical(&event)?;
    Ok(event)
}

fn normalize_country(c: String) -> String {
    if c.len() == 2 {
        c.to_ascii_uppercase()
    } else {
        c
    }
}

fn truncate_to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(t.timestamp_millis())
        .single()
        .unwrap_or(t)
}

/// A JSON object split into its fields, values still as raw JSON text.
///
/// Fields are removed as they are read, so what remains at the end are the unknown ones.
pub(crate) struct RawObject<'a> {
    /// Dotted path of this object, for error messages (`""` at the top, `"context."` below).
    prefix: String,
    /// An event has a couple of dozen fields: a vector searched linearly beats hashing them.
    fields: Vec<(Cow<'a, str>, Cow<'a, RawValue>)>,
}

impl<'a> RawObject<'a> {
    /// Parses `json` as an object. `prefix` names where it sits (`"context."`), for messages.
    pub(crate) fn parse(json: &'a str, prefix: &str) -> Result<Self, EventError> {
        let FieldList(fields) =
            serde_json::from_str(json).map_err(|e| not_an_object(json, prefix, &e))?;
        Ok(Self {
            prefix: prefix.to_string(),
            fields,
        })
    }

    pub(crate) fn take(&mut self, key: &str) -> Option<Cow<'a, RawValue>> {
        let i = self.fields.iter().position(|(k, _)| k == key)?;
        Some(self.fields.swap_remove(i).1)
    }

    pub(crate) fn contains(&self, key: &str) -> bool {
        self.fields.iter().any(|(k, _)| k == key)
    }

    /// Sets `key` unless the object already has it: translated fields never override ones the
    /// client sent under the native name.
    pub(crate) fn insert_if_absent(&mut self, key: &str, value: Cow<'a, RawValue>) {
        if !self.contains(key) {
            self.fields.push((Cow::Owned(key.to_string()), value));
        }
    }

    /// Moves `from` to `to` unless `to` is already set (then `from` stays, as an extra field).
    pub(crate) fn rename(&mut self, from: &str, to: &str) {
        if self.contains(to) {
            return;
        }
        if let Some(v) = self.take(from) {
            self.fields.push((Cow::Owned(to.to_string()), v));
        }
    }

    fn path(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn value(&self, key: &str, raw: &RawValue) -> Result<Value, EventError> {
        serde_json::from_str(raw.get())
            .map_err(|e| EventError::field(self.path(key), format!("invalid JSON: {e}")))
    }

    /// A string field. Numbers are accepted and kept as their text (SDKs often send numeric
    /// ids); blank strings and null count as absent.
    pub(crate) fn string(
        &mut self,
        key: &str,
        max_chars: usize,
    ) -> Result<Option<String>, EventError> {
        let Some(raw) = self.take(key) else {
            return Ok(None);
        };
        // Fast path for the common case, a JSON string: borrowed when it has no escapes.
        let owned: Cow<'_, str> = if raw.get().starts_with('"') {
            match serde_json::from_str::<Text<'_>>(raw.get()) {
                Ok(Text(t)) => t,
                Err(e) => {
                    return Err(EventError::field(
                        self.path(key),
                        format!("invalid JSON: {e}"),
                    ))
                }
            }
        } else {
            match self.value(key, &raw)? {
                Value::Null => return Ok(None),
                // The number as written, every digit: through a float, 18446744073709551617
                // and 18446744073709551618 would both become 1.8446744073709552e19.
                Value::Number(_) => Cow::Owned(raw.get().trim().to_string()),
                other => return Err(EventError::expected(&self.path(key), "a string", &other)),
            }
        };
        let text = owned.trim();
        if text.is_empty() {
            return Ok(None);
        }
        // Byte length bounds the character count: only count characters when it matters.
        if text.len() > max_chars && text.chars().count() > max_chars {
            return Err(EventError::field(
                self.path(key),
                format!("longer than {max_chars} characters"),
            ));
        }
        Ok(Some(text.to_string()))
    }

    /// An exact decimal, from a JSON number or a decimal string.
    pub(crate) fn decimal(&mut self, key: &str) -> Result<Option<Decimal>, EventError> {
        let Some(raw) = self.take(key) else {
            return Ok(None);
        };
        let text = raw.get().trim();
        let parsed = if text.starts_with('"') {
            match self.value(key, &raw)? {
                Value::String(s) if s.trim().is_empty() => return Ok(None),
                Value::String(s) => parse_decimal(s.trim()),
                other => return Err(EventError::expected(&self.path(key), "a decimal", &other)),
            }
        } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
            // The number's own text: exact, whatever a float would have made of it.
            parse_decimal(text)
        } else {
            let value = self.value(key, &raw)?;
            if value.is_null() {
                return Ok(None);
            }
            return Err(EventError::expected(
                &self.path(key),
                "a number or decimal string",
                &value,
            ));
        };
        let shown = text.trim_matches('"').trim();
        match parsed {
            Some(amount) => check_amount_as_sent(&self.path(key), amount, shown).map(Some),
            // Numeric text too large for any decimal (1e30): out of range, not a wrong type.
            None if looks_numeric(shown) => Err(EventError::field(
                self.path(key),
                format!(
                    "{} is out of range; amounts must be within ±{}",
                    shown.chars().take(40).collect::<String>(),
                    crate::limits::MAX_AMOUNT
                ),
            )),
            None => Err(EventError::field(
                self.path(key),
                format!(
                    "expected a number or decimal string, got \"{}\"",
                    shown.chars().take(40).collect::<String>()
                ),
            )),
        }
    }

    /// RFC 3339 text, or epoch seconds / milliseconds as a number or a digit string.
    pub(crate) fn timestamp(&mut self, key: &str) -> Result<Option<DateTime<Utc>>, EventError> {
        let Some(raw) = self.take(key) else {
            return Ok(None);
        };
        let value = self.value(key, &raw)?;
        let parsed = match &value {
            Value::Null => return Ok(None),
            Value::String(s) if s.trim().is_empty() => return Ok(None),
            Value::String(s) => {
                let s = s.trim();
                match s.parse::<f64>() {
                    Ok(n) if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') => from_epoch(n),
                    _ => DateTime::parse_from_rfc3339(s)
                        .ok()
                        .map(|t| t.with_timezone(&Utc)),
                }
            }
            Value::Number(n) => n.as_f64().and_then(from_epoch),
            _ => None,
        };
        let Some(t) = parsed else {
            return Err(EventError::expected(
                &self.path(key),
                "an RFC 3339 date-time or epoch seconds/milliseconds",
                &value,
            ));
        };
        if !(MIN_YEAR..MAX_YEAR).contains(&t.year()) {
            return Err(EventError::field(
                self.path(key),
                format!("{t} is outside {MIN_YEAR}..{MAX_YEAR}; check the unit (seconds or milliseconds)"),
            ));
        }
        Ok(Some(truncate_to_millis(t)))
    }

    /// `true`/`false`, also as strings, since form-encoded SDKs send them that way.
    pub(crate) fn boolean(&mut self, key: &str) -> Result<Option<bool>, EventError> {
        let Some(raw) = self.take(key) else {
            return Ok(None);
        };
        match self.value(key, &raw)? {
            Value::Null => Ok(None),
            Value::Bool(b) => Ok(Some(b)),
            Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            other => Err(EventError::expected(
                &self.path(key),
                "true or false",
                &other,
            )),
        }
    }

    /// A string or a list of strings; blanks dropped, duplicates kept once, order kept.
    pub(crate) fn categories(&mut self, key: &str, max: usize) -> Result<Vec<String>, EventError> {
        let Some(raw) = self.take(key) else {
            return Ok(Vec::new());
        };
        let items = match self.value(key, &raw)? {
            Value::Null => return Ok(Vec::new()),
            Value::String(s) => vec![Value::String(s)],
            Value::Array(items) => items,
            other => {
                return Err(EventError::expected(
                    &self.path(key),
                    "a string or a list of strings",
                    &other,
                ))
            }
        };
        let mut out: Vec<String> = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let Value::String(s) = item else {
                return Err(EventError::expected(
                    &format!("{}[{i}]", self.path(key)),
                    "a string",
                    &item,
                ));
            };
            let s = s.trim();
            if s.chars().count() > 256 {
                return Err(EventError::field(
                    format!("{}[{i}]", self.path(key)),
                    "longer than 256 characters",
                ));
            }
            if !s.is_empty() && !out.iter().any(|c| c == s) {
                out.push(s.to_string());
            }
        }
        if out.len() > max {
            return Err(EventError::field(
                self.path(key),
                format!("{} categories; at most {max} are accepted", out.len()),
            ));
        }
        Ok(out)
    }

    /// A free JSON object (null → absent).
    pub(crate) fn object(&mut self, key: &str) -> Result<Option<Map<String, Value>>, EventError> {
        let Some(raw) = self.take(key) else {
            return Ok(None);
        };
        match self.value(key, &raw)? {
            Value::Null => Ok(None),
            Value::Object(m) if m.is_empty() => Ok(None),
            Value::Object(m) => Ok(Some(m)),
            other => Err(EventError::expected(&self.path(key), "an object", &other)),
        }
    }

    /// A free JSON object (null → absent) both as values and as its fields' raw JSON text, so
    /// a mapping that lifts one of its fields into a native one (a Segment `properties.sku`
    /// into `product_id`) keeps a large numeric id digit for digit.
    pub(crate) fn free_object(&mut self, key: &str) -> Result<Option<FreeObject>, EventError> {
        let Some(raw) = self.take(key) else {
            return Ok(None);
        };
        match self.value(key, &raw)? {
            Value::Null => Ok(None),
            Value::Object(m) if m.is_empty() => Ok(None),
            Value::Object(values) => Ok(Some(FreeObject {
                raw: FreeObject::raw_fields(raw.get()),
                values,
            })),
            other => Err(EventError::expected(&self.path(key), "an object", &other)),
        }
    }

    /// The fields nobody read, as JSON values.
    pub(crate) fn into_rest(self) -> Result<Map<String, Value>, EventError> {
        let mut out = Map::new();
        for (k, raw) in &self.fields {
            if NATIVE_FIELDS.contains(&k.as_ref()) {
                continue;
            }
            out.insert(k.to_string(), self.value(k, raw)?);
        }
        Ok(out)
    }
}

/// A free object of a payload: its values, and each field's JSON text as sent.
pub(crate) struct FreeObject {
    pub(crate) values: Map<String, Value>,
    pub(crate) raw: Vec<(String, Box<RawValue>)>,
}

impl FreeObject {
    fn raw_fields(text: &str) -> Vec<(String, Box<RawValue>)> {
        serde_json::from_str::<std::collections::HashMap<String, Box<RawValue>>>(text)
            .map(|m| m.into_iter().collect())
            .unwrap_or_default()
    }

    /// The raw JSON text of a field, if present.
    pub(crate) fn raw(&self, key: &str) -> Option<&RawValue> {
        self.raw.iter().find(|(k, _)| k == key).map(|(_, v)| &**v)
    }

    /// A nested free object (Segment's `context.traits`), its raw text kept too.
    pub(crate) fn nested(&self, key: &str) -> Option<FreeObject> {
        let Some(Value::Object(values)) = self.values.get(key) else {
            return None;
        };
        let raw = self
            .raw(key)
            .map(|r| Self::raw_fields(r.get()))
            .unwrap_or_default();
        Some(Self {
            values: values.clone(),
            raw,
        })
    }
}

/// A JSON object's fields in order, keys and values borrowed from the input where possible.
/// A repeated key keeps its last value, as serde_json's own maps do.
struct FieldList<'a>(Vec<(Cow<'a, str>, Cow<'a, RawValue>)>);

impl<'de> serde::Deserialize<'de> for FieldList<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = FieldList<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut fields: Vec<(Cow<'de, str>, Cow<'de, RawValue>)> = Vec::with_capacity(24);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    match fields.iter_mut().find(|(k, _)| *k == key) {
                        Some(slot) => slot.1 = Cow::Borrowed(value),
                        None => fields.push((key, Cow::Borrowed(value))),
                    }
                }
                Ok(FieldList(fields))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// A JSON string, borrowed when it has no escape sequences.
struct Text<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Text<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(Visit)
    }
}

fn not_an_object(json: &str, prefix: &str, err: &serde_json::Error) -> EventError {
    let field = prefix.trim_end_matches('.');
    let message = match serde_json::from_str::<Value>(json) {
        Ok(v) => format!("expected an object, got {}", kind(&v)),
        Err(_) => format!("malformed JSON: {err}"),
    };
    if field.is_empty() {
        EventError::whole(message)
    } else {
        EventError::field(field, message)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Digits with an optional sign, point and exponent: a number, whatever its size.
fn looks_numeric(text: &str) -> bool {
    let mut digits = false;
    for (i, c) in text.char_indices() {
        match c {
            '0'..='9' => digits = true,
            '.' | 'e' | 'E' => {}
            '-' | '+' if i == 0 || text[..i].ends_with(['e', 'E']) => {}
            _ => return false,
        }
    }
    digits
}

fn parse_decimal(text: &str) -> Option<Decimal> {
    Decimal::from_str_exact(text)
        .or_else(|_| Decimal::from_scientific(text))
        .ok()
        .or_else(|| Decimal::from_str(text).ok())
}

/// Epoch seconds, or milliseconds when the number is too large to be seconds in our range.
fn from_epoch(n: f64) -> Option<DateTime<Utc>> {
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let millis = if n >= 1e11 { n } else { n * 1000.0 };
    if millis > 1e15 {
        return None;
    }
    Utc.timestamp_millis_opt(millis.round() as i64).single()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> ParseContext {
        ParseContext {
            received_at: Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap(),
            limits: Limits::default(),
        }
    }

    fn parse(v: Value) -> Result<Event, EventError> {
        parse_event(&v.to_string(), &ctx())
    }

    fn err(v: Value) -> String {
        parse(v).unwrap_err().to_string()
    }

    #[test]
    fn minimal_event_gets_defaults() {
        let e = parse(json!({"event": "page_view", "partner_id": "p1", "user_id": "u1"})).unwrap();
        assert_eq!(e.timestamp, ctx().received_at);
        assert_eq!(e.received_at, ctx().received_at);
        assert!(Uuid::parse_str(&e.message_id).is_ok());
        assert_eq!(e.partition_key(), "p1:u1");
    }

    #[test]
    fn anonymous_key() {
        let e =
            parse(json!({"event": "page_view", "partner_id": "p1", "anonymous_id": "a9"})).unwrap();
        assert_eq!(e.partition_key(), "p1:a9");
    }

    #[test]
    fn timestamp_forms() {
        let base = json!({"event": "x", "partner_id": "p", "user_id": "u"});
        let expect = Utc.with_ymd_and_hms(2026, 11, 21, 10, 0, 0).unwrap();
        for ts in [
            json!("2026-11-21T10:00:00Z"),
            json!("2026-11-21T13:00:00+03:00"),
            json!(1_795_255_200),
            json!(1_795_255_200_000_i64),
            json!("1795255200"),
            json!(1_795_255_200.0),
        ] {
            let mut v = base.clone();
            v["timestamp"] = ts.clone();
            assert_eq!(parse(v).unwrap().timestamp, expect, "{ts}");
        }
    }

    #[test]
    fn timestamp_errors_name_field() {
        let e = err(json!({"event": "x", "partner_id": "p", "user_id": "u", "timestamp": true}));
        assert!(e.starts_with("timestamp: expected an RFC 3339"), "{e}");
        // Microseconds sent as milliseconds land in the far future.
        let e = err(
            json!({"event": "x", "partner_id": "p", "user_id": "u", "timestamp": 1_795_255_200_000_000_i64}),
        );
        assert!(e.starts_with("timestamp:"), "{e}");
    }

    #[test]
    fn exact_amounts() {
        for (input, expect) in [
            (json!("19.99"), "19.99"),
            (json!(0.1), "0.1"),
            (json!(100), "100"),
            (json!("1e2"), "100"),
        ] {
            let e = parse(json!({"event": "purchase", "partner_id": "p", "user_id": "u", "cart_amount": input}))
                .unwrap();
            assert_eq!(e.cart_amount.unwrap().normalize().to_string(), expect);
        }
        // The raw number text is used, so no float rounding even at 18 significant digits.
        let raw = r#"{"event":"purchase","partner_id":"p","user_id":"u","cart_amount":999999999999.123456}"#;
        let e = parse_event(raw, &ctx()).unwrap();
        assert_eq!(e.cart_amount.unwrap().to_string(), "999999999999.123456");
    }

    #[test]
    fn amount_wrong_type() {
        assert_eq!(
            err(
                json!({"event": "purchase", "partner_id": "p", "user_id": "u", "cart_amount": true})
            ),
            "cart_amount: expected a number or decimal string, got true"
        );
        assert!(err(
            json!({"event": "purchase", "partner_id": "p", "user_id": "u", "cart_amount": "abc"})
        )
        .starts_with("cart_amount: expected a number or decimal string"));
    }

    #[test]
    fn missing_required_fields() {
        assert_eq!(
            err(json!({"partner_id": "p", "user_id": "u"})),
            "event: required field is missing"
        );
        assert_eq!(
            err(json!({"event": "x", "user_id": "u"})),
            "partner_id: required field is missing"
        );
        assert!(err(json!({"event": "x", "partner_id": "p"})).starts_with("user_id: required"));
    }

    #[test]
    fn wrong_types() {
        assert_eq!(
            err(json!({"event": "x", "partner_id": "p", "user_id": {"a": 1}})),
            "user_id: expected a string, got an object"
        );
        assert_eq!(
            err(json!({"event": "x", "partner_id": "p", "user_id": "u", "category": 3})),
            "category: expected a string or a list of strings, got 3"
        );
        assert_eq!(
            err(json!({"event": "x", "partner_id": "p", "user_id": "u", "category": ["a", 1]})),
            "category[1]: expected a string, got 1"
        );
        assert_eq!(
            err(json!({"event": "x", "partner_id": "p", "user_id": "u", "properties": [1]})),
            "properties: expected an object, got an array"
        );
        assert_eq!(
            err(json!({"event": "x", "partner_id": "p", "user_id": "u", "init_session": 3})),
            "init_session: expected true or false, got 3"
        );
    }

    #[test]
    fn not_an_object_or_malformed() {
        assert_eq!(
            parse_event("[1]", &ctx()).unwrap_err().to_string(),
            "expected an object, got an array"
        );
        assert!(parse_event("{\"event\":", &ctx())
            .unwrap_err()
            .to_string()
            .starts_with("malformed JSON"));
    }

    #[test]
    fn oversized_event() {
        let big = "x".repeat(40 * 1024);
        let e =
            err(json!({"event": "x", "partner_id": "p", "user_id": "u", "properties": {"b": big}}));
        assert!(e.contains("the limit is 32768 bytes"), "{e}");
    }

    #[test]
    fn category_string_or_list_and_unknown_fields_kept() {
        let e = parse(
            json!({"event": "Product View", "partner_id": "p", "user_id": 42,
            "category": "shoes", "color": "red", "country": "tr"}),
        )
        .unwrap();
        assert_eq!(e.event, "product_view");
        assert_eq!(e.user_id.as_deref(), Some("42"));
        assert_eq!(e.category, vec!["shoes"]);
        assert_eq!(e.country.as_deref(), Some("TR"));
        assert_eq!(e.properties.unwrap()["color"], json!("red"));
        let e = parse(json!({"event": "x", "partner_id": "p", "user_id": "u", "category": ["a", " b ", "a", ""]}))
            .unwrap();
        assert_eq!(e.category, vec!["a", "b"]);
    }

    #[test]
    fn partner_id_without_colon() {
        assert!(
            err(json!({"event": "x", "partner_id": "a:b", "user_id": "u"}))
                .starts_with("partner_id: must not contain")
        );
    }

    #[test]
    fn big_numeric_ids_keep_every_digit() {
        let raw = |n: &str| {
            format!(
                r#"{{"event":"x","partner_id":"p","user_id":{n},"anonymous_id":{n},"message_id":{n},"session_id":{n},"product_id":{n}}}"#
            )
        };
        let a = parse_event(&raw("18446744073709551617"), &ctx()).unwrap();
        let b = parse_event(&raw("18446744073709551618"), &ctx()).unwrap();
        for (x, y) in [
            (a.user_id.clone(), b.user_id.clone()),
            (a.anonymous_id.clone(), b.anonymous_id.clone()),
            (Some(a.message_id.clone()), Some(b.message_id.clone())),
            (a.session_id.clone(), b.session_id.clone()),
            (a.product_id.clone(), b.product_id.clone()),
        ] {
            assert_eq!(x.as_deref(), Some("18446744073709551617"));
            assert_eq!(y.as_deref(), Some("18446744073709551618"));
        }
        assert_ne!(a.partition_key(), b.partition_key());
        assert!(a.has_key(a.partition_key().as_bytes()));
        assert!(!a.has_key(b.partition_key().as_bytes()));
        assert!(!a.has_key(b"p:"));
        assert!(!a.has_key(b"p;18446744073709551617"));
    }

    #[test]
    fn amounts_out_of_range_are_refused() {
        for amount in [
            r#""79228162514264337593543950335""#,
            "79228162514264337593543950335",
            "1e27",
            r#""1e30""#,
            "1e30",
            "1000000000000.01",
            "-2000000000000",
        ] {
            let raw = format!(
                r#"{{"event":"purchase","partner_id":"p","user_id":"u","cart_amount":{amount}}}"#
            );
            let e = parse_event(&raw, &ctx()).unwrap_err().to_string();
            assert!(
                e.starts_with("cart_amount: ") && e.contains("out of range"),
                "{amount}: {e}"
            );
        }
        let e = err(
            json!({"event": "purchase", "partner_id": "p", "user_id": "u", "cart_amount": "0.0000000001"}),
        );
        assert!(e.contains("more than 9 decimal places"), "{e}");
        let ok = parse(
            json!({"event": "purchase", "partner_id": "p", "user_id": "u", "cart_amount": "1000000000000"}),
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn future_timestamps_beyond_the_tolerance_are_refused() {
        let at = |secs: i64| {
            let t = ctx().received_at + chrono::Duration::seconds(secs);
            json!({"event": "x", "partner_id": "p", "user_id": "u", "timestamp": t.to_rfc3339()})
        };
        assert!(parse(at(86_400)).is_ok());
        let e = err(at(86_401));
        assert!(e.starts_with("timestamp: ") && e.contains("ahead"), "{e}");
        let e = err(at(365 * 86_400));
        assert!(e.starts_with("timestamp: "), "{e}");
        let strict = ParseContext {
            limits: Limits {
                max_future_secs: 0,
                ..Limits::default()
            },
            ..ctx()
        };
        assert!(parse_event(&at(1).to_string(), &strict).is_err());
    }

    #[test]
    fn deep_objects_are_refused_consistently() {
        let nested = |levels: usize| {
            let mut v = String::from("1");
            for _ in 0..levels {
                v = format!(r#"{{"x":{v}}}"#);
            }
            format!(r#"{{"event":"x","partner_id":"p","user_id":"u","properties":{v}}}"#)
        };
        let ok = parse_event(&nested(32), &ctx()).unwrap();
        // What ingest accepts, a consumer reads back.
        assert!(Event::from_canonical_json(&ok.to_canonical_json()).is_ok());
        for levels in [33, 120, 126, 127, 130, 200] {
            let e = parse_event(&nested(levels), &ctx())
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("properties: nested") || e.contains("recursion limit"),
                "{levels}: {e}"
            );
        }
        // Unknown top-level fields land in properties: same limit.
        let mut v = String::from("1");
        for _ in 0..40 {
            v = format!("[{v}]");
        }
        let raw = format!(r#"{{"event":"x","partner_id":"p","user_id":"u","extra":{v}}}"#);
        let e = parse_event(&raw, &ctx()).unwrap_err().to_string();
        assert!(e.starts_with("properties: nested"), "{e}");
    }

    #[test]
    fn canonical_round_trip() {
        let e = parse(json!({"event": "purchase", "partner_id": "p", "user_id": "u", "cart_amount": "10.50",
            "category": ["a"], "timestamp": "2026-11-21T10:00:00.123456Z", "context": {"ip": "1.2.3.4"}}))
        .unwrap();
        let json = e.to_canonical_json();
        let back = Event::from_canonical_json(&json).unwrap();
        assert_eq!(back, e);
        let reparsed = parse_event(std::str::from_utf8(&json).unwrap(), &ctx()).unwrap();
        assert_eq!(reparsed, e);
    }
}
