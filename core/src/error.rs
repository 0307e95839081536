//! Field-level validation errors.

use std::fmt;

/// Why one event was rejected. The message always starts with the field it concerns, so a
/// client can fix its payload without reading our code: `cart_amount: expected a number or
/// decimal string, got true`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct EventError {
    /// The offending field, dotted for nested ones (`context.page.url`); `None` for the event as
    /// a whole (not an object, too large).
    pub field: Option<String>,
    pub message: String,
}

impl EventError {
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub fn whole(message: impl Into<String>) -> Self {
        Self {
            field: None,
            message: message.into(),
        }
    }

    /// `field: expected X, got <a short rendering of the JSON value>`.
    pub fn expected(field: &str, expected: &str, got: &serde_json::Value) -> Self {
        Self::field(field, format!("expected {expected}, got {}", describe(got)))
    }
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Renders a JSON value for an error message: scalars as written, containers by kind, and
/// long strings cut, so a 1 MB string never ends up in a response or a log line.
fn describe(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.chars().count() > 40 => {
            let cut: String = s.chars().take(40).collect();
            format!("string \"{cut}…\"")
        }
        Value::String(s) => format!("string \"{s}\""),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_field_and_value() {
        let e = EventError::expected("cart_amount", "a number or decimal string", &json!(true));
        assert_eq!(
            e.to_string(),
            "cart_amount: expected a number or decimal string, got true"
        );
    }

    #[test]
    fn cuts_long_strings() {
        let long = "x".repeat(1000);
        let e = EventError::expected("country", "a 2-letter code", &json!(long));
        assert!(e.to_string().len() < 120, "{e}");
    }
}
