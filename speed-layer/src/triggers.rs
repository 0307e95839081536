//! Trigger rules: "event = add_to_cart and cart_amount > 100 → push with template T".
//!
//! Rules come from a TOML file. A fired trigger carries an idempotency key derived from the
//! rule and the event's partner, user and `message_id`, so an event that is re-read after a
//! crash, or replayed, produces the same key and the notifier (and the partner's push service, through the
//! `Idempotency-Key` header) delivers it once.

use std::path::Path;
use std::str::FromStr;

use pulse_core::Event;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The rules file: `[[rule]]` tables.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    #[serde(default, rename = "rule")]
    pub rules: Vec<TriggerRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerRule {
    /// Stable id: part of the idempotency key, so renaming a rule re-arms it. Unique in the
    /// file.
    pub id: String,
    /// Whose events it fires on: a partner id, or `"*"` for every partner's (a rule of the
    /// whole deployment; each push still goes to its own partner's webhook). Required: many
    /// partners share a deployment, and a rule one partner asked for must not push another
    /// partner's users.
    pub partner: String,
    /// Event type it fires on (snake_case, as on the topic).
    pub event: String,
    /// What the notifier does: `push` (the only channel so far).
    #[serde(default = "default_action")]
    pub action: String,
    /// Message template the partner's push service renders.
    pub template: String,
    /// All must hold.
    #[serde(default)]
    pub when: Vec<Condition>,
}

fn default_action() -> String {
    "push".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// An event field: `cart_amount`, `country`, `category`, `page_type`, …
    pub field: String,
    pub op: Op,
    /// Operand of eq/ne/gt/gte/lt/lte.
    #[serde(default)]
    pub value: Option<String>,
    /// Operand of `in`.
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
    In,
    Exists,
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("reading rules file {0}: {1}")]
    Read(String, std::io::Error),
    #[error("rules file {0}: {1}")]
    Parse(String, String),
    #[error("rule {rule}: {message}")]
    Invalid { rule: String, message: String },
}

impl RuleSet {
    pub fn load(path: &Path) -> Result<Self, RulesError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RulesError::Read(path.display().to_string(), e))?;
        Self::from_toml(&text).map_err(|e| match e {
            RulesError::Parse(_, m) => RulesError::Parse(path.display().to_string(), m),
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, RulesError> {
        let set: RuleSet =
            toml::from_str(text).map_err(|e| RulesError::Parse(String::new(), e.to_string()))?;
        let mut ids = std::collections::HashSet::new();
        for rule in &set.rules {
            rule.validate()?;
            if !ids.insert(rule.id.as_str()) {
                return Err(RulesError::Invalid {
                    rule: rule.id.clone(),
                    message: "another rule has the same id (ids key the pushes and their \
                              metrics)"
                        .into(),
                });
            }
        }
        Ok(set)
    }

    /// Rules that fire for this event.
    pub fn matching<'a>(&'a self, event: &'a Event) -> impl Iterator<Item = &'a TriggerRule> + 'a {
        self.rules.iter().filter(move |r| r.matches(event))
    }
}

impl TriggerRule {
    fn validate(&self) -> Result<(), RulesError> {
        let invalid = |message: String| RulesError::Invalid {
            rule: self.id.clone(),
            message,
        };
        if self.id.trim().is_empty() {
            return Err(invalid("id must not be empty".into()));
        }
        if self.partner.trim().is_empty() {
            return Err(invalid(
                "partner must be a partner id, or \"*\" for every partner".into(),
            ));
        }
        for c in &self.when {
            match c.op {
                Op::In if c.values.is_empty() => {
                    return Err(invalid(format!("{}: `in` needs `values = [...]`", c.field)))
                }
                Op::Gt | Op::Gte | Op::Lt | Op::Lte => {
                    let v = c.value.as_deref().unwrap_or_default();
                    Decimal::from_str(v).map_err(|_| {
                        invalid(format!(
                            "{}: `{:?}` needs a numeric value, got {v:?}",
                            c.field, c.op
                        ))
                    })?;
                }
                Op::Eq | Op::Ne if c.value.is_none() => {
                    return Err(invalid(format!("{}: `{:?}` needs `value`", c.field, c.op)))
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn matches(&self, event: &Event) -> bool {
        event.event == self.event
            && (self.partner == "*" || self.partner == event.partner_id)
            && self.when.iter().all(|c| c.holds(event))
    }

    /// Same rule, same event → same key, however often the event is read or retried.
    ///
    /// Scoped by partner and user, not by `message_id` alone: two partners may both send
    /// `order-1001` and both get their push, and no partner can suppress another's pushes by
    /// guessing ids. The scope is hashed (SHA-256 of the JSON array `[partner, user,
    /// message_id]`, unambiguous whatever the ids contain) so the key stays short enough for a
    /// push provider's `Idempotency-Key` header whatever the id lengths.
    pub fn idempotency_key(&self, event: &Event) -> String {
        self.idempotency_key_for(event, event.person_id())
    }

    /// [`Self::idempotency_key`] of `event` fired for `person`: the person an event of a
    /// merged anonymous device belongs to (see `crate::identity`), else the event's own id.
    pub fn idempotency_key_for(&self, event: &Event, person: &str) -> String {
        use sha2::{Digest, Sha256};
        let scope = serde_json::json!([event.partner_id, person, event.message_id]);
        let digest = Sha256::digest(scope.to_string().as_bytes());
        let mut key = String::with_capacity(self.id.len() + 1 + 64);
        key.push_str(&self.id);
        key.push(':');
        for b in digest.iter() {
            key.push_str(&format!("{b:02x}"));
        }
        key
    }
}

impl Condition {
    fn holds(&self, event: &Event) -> bool {
        let values = field_values(event, &self.field);
        match self.op {
            Op::Exists => !values.is_empty(),
            Op::Eq => values
                .iter()
                .any(|v| Some(v.as_str()) == self.value.as_deref()),
            Op::Ne => !values
                .iter()
                .any(|v| Some(v.as_str()) == self.value.as_deref()),
            Op::In => values.iter().any(|v| self.values.iter().any(|x| x == v)),
            Op::Gt | Op::Gte | Op::Lt | Op::Lte => {
                let Some(limit) = self
                    .value
                    .as_deref()
                    .and_then(|v| Decimal::from_str(v).ok())
                else {
                    return false;
                };
                values
                    .iter()
                    .filter_map(|v| Decimal::from_str(v).ok())
                    .any(|x| match self.op {
                        Op::Gt => x > limit,
                        Op::Gte => x >= limit,
                        Op::Lt => x < limit,
                        _ => x <= limit,
                    })
            }
        }
    }
}

/// The values of an event field as text (a list for `category`).
fn field_values(event: &Event, field: &str) -> Vec<String> {
    let one = |v: &Option<String>| v.iter().cloned().collect::<Vec<_>>();
    match field {
        "event" => vec![event.event.clone()],
        "partner_id" => vec![event.partner_id.clone()],
        "user_id" => one(&event.user_id),
        "anonymous_id" => one(&event.anonymous_id),
        "session_id" => one(&event.session_id),
        "country" => one(&event.country),
        "language" => one(&event.language),
        "version" => one(&event.version),
        "page_type" => one(&event.page_type),
        "product_id" => one(&event.product_id),
        "search_query" => one(&event.search_query),
        "gender" => one(&event.gender),
        "referrer" => one(&event.referrer),
        "current_url" => one(&event.current_url),
        "category" => event.category.clone(),
        "cart_amount" => event.cart_amount.iter().map(|d| d.to_string()).collect(),
        "init_session" => event.init_session.iter().map(|b| b.to_string()).collect(),
        other => event
            .properties
            .as_ref()
            .and_then(|p| p.get(other.strip_prefix("properties.").unwrap_or(other)))
            .map(|v| match v {
                serde_json::Value::String(s) => vec![s.clone()],
                serde_json::Value::Null => vec![],
                v => vec![v.to_string()],
            })
            .unwrap_or_default(),
    }
}

/// A fired trigger, as written to the `triggers` topic (keyed by the profile id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerMessage {
    pub idempotency_key: String,
    pub rule_id: String,
    pub action: String,
    pub template: String,
    pub partner_id: String,
    pub user_id: String,
    pub event: String,
    pub message_id: String,
    /// Event time, epoch milliseconds.
    pub event_timestamp: i64,
    /// When the speed layer fired it, epoch milliseconds.
    pub fired_at: i64,
    /// When ingest received the event, epoch milliseconds (0 in triggers written before it
    /// was carried).
    #[serde(default)]
    pub received_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cart_amount: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub category: Vec<String>,
}

impl TriggerMessage {
    pub fn new(rule: &TriggerRule, event: &Event, fired_at: i64) -> Self {
        Self::for_person(rule, event, event.person_id(), fired_at)
    }

    /// The trigger of `event` for `person`, the profile it was folded into: a cart of an
    /// anonymous device merged into a person is pushed to the person.
    pub fn for_person(rule: &TriggerRule, event: &Event, person: &str, fired_at: i64) -> Self {
        Self {
            idempotency_key: rule.idempotency_key_for(event, person),
            rule_id: rule.id.clone(),
            action: rule.action.clone(),
            template: rule.template.clone(),
            partner_id: event.partner_id.clone(),
            user_id: person.to_string(),
            event: event.event.clone(),
            message_id: event.message_id.clone(),
            event_timestamp: event.timestamp.timestamp_millis(),
            fired_at,
            received_at: event.received_at.timestamp_millis(),
            cart_amount: event.cart_amount.map(|d| d.to_string()),
            product_id: event.product_id.clone(),
            category: event.category.clone(),
        }
    }

    /// When the event happened, epoch milliseconds: its own time, but never later than
    /// ingest received it (nor than the trigger fired), so a client clock set ahead cannot
    /// make an old event look recent.
    pub fn occurred_at(&self) -> i64 {
        let bound = if self.received_at > 0 {
            self.received_at
        } else {
            self.fired_at
        };
        self.event_timestamp.min(bound)
    }

    /// Key on the triggers topic: one user's triggers on one partition, so one notifier
    /// instance owns that user's rate limit.
    pub fn key(&self) -> String {
        pulse_core::event::partition_key(&self.partner_id, &self.user_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulse_core::{parse_event, ParseContext};

    const RULES: &str = r#"
        [[rule]]
        id = "cart-push"
        partner = "p"
        event = "add_to_cart"
        template = "cart_reminder"
        when = [
          { field = "cart_amount", op = "gt", value = "100" },
          { field = "country", op = "in", values = ["TR", "GB"] },
        ]

        [[rule]]
        id = "any-purchase"
        partner = "*"
        event = "purchase"
        template = "thanks"
    "#;

    fn ev(json: &str) -> Event {
        parse_event(json, &ParseContext::now()).unwrap()
    }

    #[test]
    fn conditions() {
        let rules = RuleSet::from_toml(RULES).unwrap();
        let hit = ev(
            r#"{"event":"add_to_cart","partner_id":"p","user_id":"u","cart_amount":"100.01","country":"TR","message_id":"m1"}"#,
        );
        let cheap = ev(
            r#"{"event":"add_to_cart","partner_id":"p","user_id":"u","cart_amount":"100","country":"TR"}"#,
        );
        let elsewhere = ev(
            r#"{"event":"add_to_cart","partner_id":"p","user_id":"u","cart_amount":"500","country":"US"}"#,
        );
        let ids = |e: &Event| rules.matching(e).map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&hit), vec!["cart-push"]);
        assert!(ids(&cheap).is_empty());
        assert!(ids(&elsewhere).is_empty());
        let key = rules.rules[0].idempotency_key(&hit);
        assert!(
            key.starts_with("cart-push:") && key.len() == "cart-push:".len() + 64,
            "{key}"
        );
        // Same event read again → same key.
        assert_eq!(rules.rules[0].idempotency_key(&hit), key);
    }

    #[test]
    fn keys_are_scoped_by_partner_and_user() {
        let rules = RuleSet::from_toml(RULES).unwrap();
        let rule = &rules.rules[1];
        let buy = |partner: &str, user: &str, id: &str| {
            ev(&format!(
                r#"{{"event":"purchase","partner_id":"{partner}","user_id":"{user}","message_id":"{id}"}}"#
            ))
        };
        let a = rule.idempotency_key(&buy("a", "u", "order-1001"));
        assert_ne!(a, rule.idempotency_key(&buy("b", "u", "order-1001")));
        assert_ne!(a, rule.idempotency_key(&buy("a", "v", "order-1001")));
        assert_ne!(a, rule.idempotency_key(&buy("a", "u", "order-1002")));
        // Separators inside ids cannot make two scopes collide.
        assert_ne!(
            rule.idempotency_key(&buy("a", "u:x", "y")),
            rule.idempotency_key(&buy("a", "u", "x:y"))
        );
    }

    #[test]
    fn invalid_rules_are_named() {
        let e = RuleSet::from_toml(
            r#"[[rule]]
            id = "r"
            partner = "p"
            event = "x"
            template = "t"
            when = [{ field = "cart_amount", op = "gt", value = "lots" }]"#,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("rule r: cart_amount"), "{e}");
        assert!(RuleSet::from_toml("[[rule]]\nid = 1").is_err());
        let e = RuleSet::from_toml("[[rule]]\nid = \"r\"\nevent = \"x\"\ntemplate = \"t\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("missing field `partner`"), "{e}");
        let twice = "[[rule]]\nid = \"r\"\npartner = \"a\"\nevent = \"x\"\ntemplate = \"t\"\n";
        let e = RuleSet::from_toml(&format!("{twice}{twice}")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("rule r: another rule has the same id"),
            "{e}"
        );
    }

    #[test]
    fn a_rule_fires_for_its_partner_only() {
        let rules = RuleSet::from_toml(RULES).unwrap();
        let cart = |partner: &str| {
            ev(&format!(
                r#"{{"event":"add_to_cart","partner_id":"{partner}","user_id":"u","cart_amount":"500","country":"TR"}}"#
            ))
        };
        let ids = |e: &Event| rules.matching(e).map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&cart("p")), vec!["cart-push"]);
        assert!(ids(&cart("q")).is_empty(), "partner p's rule, q's cart");
        let buy = ev(r#"{"event":"purchase","partner_id":"q","user_id":"u"}"#);
        assert_eq!(ids(&buy), vec!["any-purchase"], "\"*\": every partner's");
    }
}
