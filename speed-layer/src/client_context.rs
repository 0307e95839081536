//! What a profile keeps of the client behind a user's latest events: partner name, country,
//! app version, language, referrer and user agent, each the latest value an event carried.
//!
//! Thousands of users of a shop share one combination, so a profile holds a pointer to one
//! shared copy of it (8 bytes, where six strings of its own were 144 and their text): a
//! user's events mostly repeat the combination they had, which costs six comparisons and no
//! lookup; a new one is looked up once in a bounded table ([`crate::interned`]).

use std::sync::Arc;

use pulse_core::Event;

use crate::interned::{intern, set_latest, Interner, Shared};

/// The document fields, in the order [`ClientContext`] holds them.
pub const FIELDS: [&str; 6] = [
    "partner_name",
    "country",
    "version",
    "language",
    "referrer",
    "user_agent",
];

/// The latest value of each of [`FIELDS`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ClientContext([Option<Shared>; 6]);

static CONTEXTS: Interner<ClientContext> = Interner::new();

/// The event's values of [`FIELDS`].
fn values_of(event: &Event) -> [Option<&str>; 6] {
    [
        event.partner_name.as_deref(),
        event.country.as_deref(),
        event.version.as_deref(),
        event.language.as_deref(),
        event.referrer.as_deref(),
        event.user_agent.as_deref(),
    ]
}

impl ClientContext {
    /// The value of `field` (one of [`FIELDS`]).
    pub fn get(&self, field: &str) -> Option<&str> {
        let i = FIELDS.iter().position(|f| *f == field)?;
        self.0[i].as_deref()
    }

    /// Each field with its value, for the document.
    pub fn fields(&self) -> impl Iterator<Item = (&'static str, &str)> {
        FIELDS
            .iter()
            .zip(&self.0)
            .filter_map(|(f, v)| Some((*f, v.as_deref()?)))
    }

    /// The context after `event` (its values where it has them, the current ones where it
    /// has none), or `None` when it changes nothing.
    pub fn after(current: Option<&Arc<Self>>, event: &Event) -> Option<Arc<Self>> {
        let values = values_of(event);
        let now = current.map(|c| &c.0);
        let changes = values
            .iter()
            .enumerate()
            .any(|(i, v)| v.is_some_and(|v| now.and_then(|c| c[i].as_deref()) != Some(v)));
        if !changes {
            return None;
        }
        let mut next = current.map_or_else(Self::default, |c| (**c).clone());
        for (slot, v) in next.0.iter_mut().zip(values) {
            set_latest(slot, v);
        }
        Some(CONTEXTS.intern(&next))
    }

    /// The context stored in a document, whose field `f` `get(f)` reads.
    pub fn stored<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<Arc<Self>> {
        let mut stored = Self::default();
        for (slot, f) in stored.0.iter_mut().zip(FIELDS) {
            *slot = get(f).map(intern);
        }
        stored
            .0
            .iter()
            .any(Option::is_some)
            .then(|| CONTEXTS.intern(&stored))
    }

    /// Two profiles' contexts as one (a merge): `theirs`'s values where it has them and it
    /// is the newer or `ours` has none.
    pub fn merged(
        ours: Option<&Arc<Self>>,
        theirs: Option<&Arc<Self>>,
        theirs_newer: bool,
    ) -> Option<Arc<Self>> {
        let (Some(ours), Some(theirs)) = (ours, theirs) else {
            return ours.or(theirs).cloned();
        };
        let mut next = (**ours).clone();
        for (slot, v) in next.0.iter_mut().zip(&theirs.0) {
            if v.is_some() && (theirs_newer || slot.is_none()) {
                slot.clone_from(v);
            }
        }
        Some(CONTEXTS.intern(&next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulse_core::{parse_event, ParseContext};

    fn ev(json: &str) -> Event {
        parse_event(json, &ParseContext::now()).unwrap()
    }

    #[test]
    fn latest_values_shared_between_profiles() {
        let first = ev(
            r#"{"event":"page_view","partner_id":"p","user_id":"u","country":"TR","user_agent":"UA/1"}"#,
        );
        let a = ClientContext::after(None, &first).expect("a context");
        let b = ClientContext::after(None, &first).expect("a context");
        assert!(Arc::ptr_eq(&a, &b), "one copy of a combination");
        assert!(
            ClientContext::after(Some(&a), &first).is_none(),
            "nothing changed"
        );
        let later = ev(r#"{"event":"page_view","partner_id":"p","user_id":"u","country":"GB"}"#);
        let c = ClientContext::after(Some(&a), &later).expect("changed");
        assert_eq!(
            c.fields().collect::<Vec<_>>(),
            [("country", "GB"), ("user_agent", "UA/1")],
            "an event without a field keeps the one before"
        );
        let merged = ClientContext::merged(Some(&c), Some(&a), true).unwrap();
        assert_eq!(merged.get("country"), Some("TR"));
        let stored = ClientContext::stored(|f| merged.get(f)).unwrap();
        assert!(Arc::ptr_eq(&stored, &merged));
        assert!(ClientContext::stored(|_| None).is_none());
    }
}
