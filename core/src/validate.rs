//! The rules every canonical event obeys, checked in one place by every reader.
//!
//! Ingest applies them while parsing (with the field named in the 400 answer); the speed
//! layer, the archiver and recompute apply them again to each record they read, because the
//! `events` topic can also be written by other producers. A record that breaks one goes to the
//! dead-letter topic with the same message ingest would have answered, so "ingest said 2xx"
//! and "a consumer can fold it" are the same statement.

use rust_decimal::Decimal;
use serde_json::{Map, Value};

use crate::error::EventError;
use crate::event::Event;
use crate::limits::{
    MAX_AMOUNT, MAX_AMOUNT_SCALE, MAX_FUTURE_SECS_CEILING, MAX_JSON_DEPTH, MAX_PROFILE_ID_BYTES,
    MAX_YEAR, MIN_YEAR,
};
use crate::names::MAX_EVENT_NAME;

/// Longest `partner_id`, `message_id` and user ids, in characters. A user id is also limited
/// in bytes with its partner id: see [`MAX_PROFILE_ID_BYTES`].
pub const MAX_PARTNER_ID: usize = 128;
pub const MAX_MESSAGE_ID: usize = 128;
pub const MAX_USER_ID: usize = 256;

/// Checks what a consumer relies on: the ids that make the key and the dedupe key, the event
/// type's form, the amount range and the nesting depth. Field-level messages, as at ingest.
pub fn check_canonical(event: &Event) -> Result<(), EventError> {
    required_text("message_id", &event.message_id, MAX_MESSAGE_ID)?;
    check_partner_id(&event.partner_id)?;
    if !is_event_type(&event.event) {
        return Err(EventError::field(
            "event",
            format!(
                "\"{}\" is not a snake_case event type",
                event.event.chars().take(64).collect::<String>()
            ),
        ));
    }
    let user = event.user_id.as_deref().filter(|u| !u.trim().is_empty());
    let anonymous = event
        .anonymous_id
        .as_deref()
        .filter(|u| !u.trim().is_empty());
    if user.is_none() && anonymous.is_none() {
        return Err(EventError::field(
            "user_id",
            "required field is missing (send user_id or anonymous_id)",
        ));
    }
    for (field, id) in [("user_id", user), ("anonymous_id", anonymous)] {
        if let Some(id) = id {
            check_person_id(field, &event.partner_id, id)?;
        }
    }
    if let Some(amount) = event.cart_amount {
        check_amount("cart_amount", amount)?;
    }
    check_depth("properties", event.properties.as_ref())?;
    check_depth("context", event.context.as_ref())?;
    for (field, at) in [
        ("timestamp", event.timestamp),
        ("received_at", event.received_at),
    ] {
        if !(MIN_YEAR..MAX_YEAR).contains(&chrono::Datelike::year(&at)) {
            return Err(EventError::field(
                field,
                format!("{} is outside {MIN_YEAR}..{MAX_YEAR}", at.to_rfc3339()),
            ));
        }
    }
    let ceiling = chrono::Duration::seconds(i64::from(MAX_FUTURE_SECS_CEILING));
    if event.timestamp > event.received_at + ceiling {
        return Err(EventError::field(
            "timestamp",
            format!(
                "{} is more than {MAX_FUTURE_SECS_CEILING} s ahead of received_at {}",
                event.timestamp.to_rfc3339(),
                event.received_at.to_rfc3339()
            ),
        ));
    }
    Ok(())
}

/// An amount inside the documented range: |amount| ≤ 10^12, at most 9 decimal places. The
/// amount is returned as given (its scale is the client's, "10.50" stays "10.50").
pub fn check_amount(field: &str, amount: Decimal) -> Result<Decimal, EventError> {
    check_amount_as_sent(field, amount, &amount.to_string())
}

/// [`check_amount`], naming the amount as the client wrote it (`1e27`, not 27 zeros).
pub fn check_amount_as_sent(
    field: &str,
    amount: Decimal,
    sent: &str,
) -> Result<Decimal, EventError> {
    let sent: String = sent.chars().take(40).collect();
    if amount.abs() > MAX_AMOUNT {
        return Err(EventError::field(
            field,
            format!("{sent} is out of range; amounts must be within ±{MAX_AMOUNT}"),
        ));
    }
    // Trailing zeros are not places that matter: "1.50000000000" is 1.5.
    if amount.normalize().scale() > MAX_AMOUNT_SCALE {
        return Err(EventError::field(
            field,
            format!("{sent} has more than {MAX_AMOUNT_SCALE} decimal places"),
        ));
    }
    Ok(amount)
}

/// Nesting depth of a JSON value: a scalar is 0, `{"a": 1}` is 1, `{"a": {"b": 1}}` is 2.
/// Recursive: values come from serde_json, whose parser refuses anything deeper than 128.
pub fn json_depth(value: &Value) -> usize {
    match value {
        Value::Object(m) => 1 + m.values().map(json_depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Refuses a free object nested deeper than [`MAX_JSON_DEPTH`].
pub fn check_depth(field: &str, object: Option<&Map<String, Value>>) -> Result<(), EventError> {
    let Some(object) = object else {
        return Ok(());
    };
    let depth = 1 + object.values().map(json_depth).max().unwrap_or(0);
    if depth > MAX_JSON_DEPTH {
        return Err(EventError::field(
            field,
            format!("nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted"),
        ));
    }
    Ok(())
}

/// The form `names::normalize_event_name` produces: lower-case ASCII letters, digits and
/// single underscores, starting with a letter, at most 64 characters.
pub fn is_event_type(name: &str) -> bool {
    name.len() <= MAX_EVENT_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('_')
        && !name.contains("__")
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A partner id: present, at most [`MAX_PARTNER_ID`] characters, without ':'.
pub fn check_partner_id(partner_id: &str) -> Result<(), EventError> {
    required_text("partner_id", partner_id, MAX_PARTNER_ID)?;
    if partner_id.contains(':') {
        return Err(EventError::field(
            "partner_id",
            "must not contain ':' (it separates partner and user in the Kafka key)",
        ));
    }
    Ok(())
}

/// A user or anonymous id of `partner_id`'s: present, at most [`MAX_USER_ID`] characters, and
/// with the partner id a profile id (`{partner_id}:{id}`, the document's `_id`) Elasticsearch
/// takes. Every id that names a profile passes here: an event's, and an id an identity link
/// names (a Segment alias's `previousId`).
pub fn check_person_id(field: &str, partner_id: &str, id: &str) -> Result<(), EventError> {
    required_text(field, id, MAX_USER_ID)?;
    let bytes = partner_id.len() + 1 + id.len();
    if bytes > MAX_PROFILE_ID_BYTES {
        return Err(EventError::field(
            field,
            format!(
                "{} bytes of UTF-8: with partner_id it makes a profile id \
                 \"{{partner_id}}:{{{field}}}\" of {bytes} bytes, and Elasticsearch \
                 takes at most {MAX_PROFILE_ID_BYTES}",
                id.len()
            ),
        ));
    }
    Ok(())
}

fn required_text(field: &str, value: &str, max_chars: usize) -> Result<(), EventError> {
    if value.trim().is_empty() {
        return Err(EventError::field(field, "required field is missing"));
    }
    if value.len() > max_chars && value.chars().count() > max_chars {
        return Err(EventError::field(
            field,
            format!("longer than {max_chars} characters"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depth() {
        assert_eq!(json_depth(&json!(1)), 0);
        assert_eq!(json_depth(&json!({"a": 1})), 1);
        assert_eq!(json_depth(&json!({"a": [{"b": 1}]})), 3);
        let mut v = json!(1);
        for _ in 0..40 {
            v = json!({ "x": v });
        }
        let Value::Object(m) = v else { unreachable!() };
        let e = check_depth("properties", Some(&m)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "properties: nested 40 levels deep; at most 32 are accepted"
        );
    }

    #[test]
    fn amounts() {
        use std::str::FromStr;
        let d = |s: &str| Decimal::from_str(s).unwrap();
        assert!(check_amount("cart_amount", d("1000000000000")).is_ok());
        assert!(check_amount("cart_amount", d("-1000000000000")).is_ok());
        assert!(check_amount("cart_amount", d("1000000000000.01")).is_err());
        assert!(check_amount("cart_amount", d("79228162514264337593543950335")).is_err());
        assert!(check_amount("cart_amount", d("0.123456789")).is_ok());
        assert!(check_amount("cart_amount", d("0.1234567891")).is_err());
        // Trailing zeros are not decimal places that matter.
        assert!(check_amount("cart_amount", d("1.50000000000")).is_ok());
    }

    #[test]
    fn a_record_dated_beyond_the_ceiling_is_refused() {
        let mut e = crate::parse_event(
            r#"{"event":"x","partner_id":"p","user_id":"u"}"#,
            &crate::ParseContext::now(),
        )
        .unwrap();
        assert!(check_canonical(&e).is_ok());
        e.timestamp = e.received_at + chrono::Duration::days(8);
        let err = check_canonical(&e).unwrap_err().to_string();
        assert!(
            err.starts_with("timestamp: ") && err.contains("ahead"),
            "{err}"
        );
    }

    #[test]
    fn a_receive_time_outside_the_years_is_refused() {
        let ctx = crate::ParseContext::now();
        let mut e =
            crate::parse_event(r#"{"event":"x","partner_id":"p","user_id":"u"}"#, &ctx).unwrap();
        for year in [
            "1969-12-31T00:00:00Z",
            "2106-02-07T06:28:16Z",
            "1999-12-31T23:59:59Z",
        ] {
            e.received_at = year.parse().unwrap();
            e.timestamp = e.received_at;
            let err = check_canonical(&e).unwrap_err().to_string();
            assert!(
                err.starts_with("timestamp: ") || err.starts_with("received_at: "),
                "{err}"
            );
            e.timestamp = ctx.received_at;
            let err = check_canonical(&e).unwrap_err().to_string();
            assert!(
                err.starts_with("received_at: ") && err.contains("outside 2000..2100"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_profile_id_beyond_what_elasticsearch_takes_is_refused() {
        let ctx = crate::ParseContext::now();
        let with_user =
            |user: &str| format!(r#"{{"event":"x","partner_id":"bazaar","user_id":"{user}"}}"#);
        // 256 characters of 4 bytes: within the character limit, 1,024 bytes.
        let wide = "\u{1F600}".repeat(256);
        let err = crate::parse_event(&with_user(&wide), &ctx)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("user_id: 1024 bytes of UTF-8"), "{err}");
        assert!(
            err.contains("profile id \"{partner_id}:{user_id}\" of 1031 bytes"),
            "{err}"
        );
        // 505 bytes of user id with "bazaar:" is 512: the most Elasticsearch takes.
        let most = format!("{}{}", "\u{e9}".repeat(126), "a".repeat(253));
        assert_eq!(most.chars().count(), 379);
        assert_eq!("bazaar:".len() + most.len(), 512);
        // Over the 256-character limit: limited by characters first.
        assert!(crate::parse_event(&with_user(&most), &ctx).is_err());
        let fits = format!("{}{}", "\u{e9}".repeat(126), "a".repeat(130));
        assert!("bazaar:".len() + fits.len() <= 512);
        assert!(crate::parse_event(&with_user(&fits), &ctx).is_ok());
        let over = format!("{}{}", "\u{20ac}".repeat(168), "a".repeat(2));
        assert_eq!("bazaar:".len() + over.len(), 513);
        let err = crate::parse_event(&with_user(&over), &ctx)
            .unwrap_err()
            .to_string();
        assert!(err.contains("of 513 bytes"), "{err}");
        let mut anon = crate::parse_event(
            r#"{"event":"x","partner_id":"bazaar","anonymous_id":"a"}"#,
            &ctx,
        )
        .unwrap();
        anon.anonymous_id = Some(over);
        let err = check_canonical(&anon).unwrap_err().to_string();
        assert!(err.starts_with("anonymous_id: "), "{err}");
    }

    #[test]
    fn event_types() {
        assert!(is_event_type("add_to_cart"));
        assert!(is_event_type("step2"));
        for bad in ["", "Add", "_x", "x_", "a__b", "a-b", "1a"] {
            assert!(!is_event_type(bad), "{bad}");
        }
        assert!(!is_event_type(&"a".repeat(65)));
    }
}
