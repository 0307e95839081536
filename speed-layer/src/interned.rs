//! Values many profiles hold the same of, kept once in memory: partner names, countries,
//! languages, app versions, referrers, user agents, categories, event types and genders (as
//! [`Shared`] text), and the combination of a client's latest values a profile keeps
//! ([`crate::profile::ClientContext`]). A million profiles of one shop hold one copy of its
//! user agents, not a million; each profile holds a pointer where it held a `String` (24
//! bytes and a copy).
//!
//! Each table is bounded and forgets what no profile holds any more: when it is full it drops
//! the values only it still points to, at most once per quarter of its size in new values
//! (so a partner sending a new user agent with every event costs an occasional sweep, not one
//! per event). A value that finds its table full of live values is kept by its profile alone:
//! sharing is an optimisation, never a condition.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};

/// A shared piece of text.
pub type Shared = Arc<str>;

/// Most distinct values a table keeps.
const MAX_VALUES: usize = 65_536;

struct Table<T: ?Sized> {
    values: HashSet<Arc<T>, ahash::RandomState>,
    /// New values since the last sweep (while full): the next sweep waits for a quarter of
    /// the table's size of them.
    since_sweep: usize,
}

impl<T: ?Sized> Default for Table<T> {
    fn default() -> Self {
        Self {
            values: HashSet::default(),
            since_sweep: 0,
        }
    }
}

impl<T: ?Sized + Hash + Eq> Table<T> {
    /// The shared copy of `value`, made by `make` when the table has none.
    fn get(&mut self, value: &T, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        if let Some(known) = self.values.get(value) {
            return known.clone();
        }
        let new = make();
        if self.values.len() >= MAX_VALUES {
            self.since_sweep += 1;
            if self.since_sweep >= MAX_VALUES / 4 {
                // Only the table holds these: no profile has them any more.
                self.values.retain(|v| Arc::strong_count(v) > 1);
                self.since_sweep = 0;
            }
        }
        if self.values.len() < MAX_VALUES {
            self.values.insert(new.clone());
        }
        new
    }
}

/// The shared values of one type: a table behind a lock, made on first use (so it can be a
/// `static`).
pub struct Interner<T: ?Sized>(OnceLock<Mutex<Table<T>>>);

impl<T: ?Sized> Interner<T> {
    pub const fn new() -> Self {
        Self(OnceLock::new())
    }
}

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: ?Sized + Hash + Eq> Interner<T> {
    fn lookup(&self, value: &T, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        self.0
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(value, make)
    }
}

impl<T: Hash + Eq + Clone> Interner<T> {
    /// The shared copy of `value`.
    pub fn intern(&self, value: &T) -> Arc<T> {
        self.lookup(value, || Arc::new(value.clone()))
    }
}

/// The shared copy of `text`.
pub fn intern(text: &str) -> Shared {
    static TEXT: Interner<str> = Interner::new();
    TEXT.lookup(text, || Arc::from(text))
}

/// Sets `slot` to `value` if it has one (the latest value wins; an event without the field
/// keeps the one before), interning only a value that differs from the slot's: most of a
/// user's events repeat the last one, and those cost a comparison.
pub fn set_latest(slot: &mut Option<Shared>, value: Option<&str>) {
    if let Some(v) = value {
        if slot.as_deref() != Some(v) {
            *slot = Some(intern(v));
        }
    }
}

/// Serde for an `Option<Shared>` field, stored as the optional string it is (serde's own
/// `Arc` support needs its `rc` feature, which would rebuild every crate that uses serde).
pub mod optional {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{intern, Shared};

    pub fn serialize<S: Serializer>(value: &Option<Shared>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => s.serialize_some(&**v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Shared>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.map(|v| intern(&v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_of_each_value() {
        let a = intern("Mozilla/5.0 (one)");
        let b = intern("Mozilla/5.0 (one)");
        assert!(Arc::ptr_eq(&a, &b));
        let mut slot = None;
        set_latest(&mut slot, Some("Mozilla/5.0 (one)"));
        assert!(Arc::ptr_eq(slot.as_ref().unwrap(), &a));
        set_latest(&mut slot, None);
        assert_eq!(
            slot.as_deref(),
            Some("Mozilla/5.0 (one)"),
            "no value keeps the last"
        );
    }

    #[test]
    fn a_full_table_forgets_values_no_one_holds_and_still_answers() {
        let mut table = Table::<str>::default();
        let get = |table: &mut Table<str>, text: &str| table.get(text, || Arc::from(text));
        let kept = get(&mut table, "kept");
        for i in 0..MAX_VALUES {
            get(&mut table, &format!("gone-{i}"));
        }
        assert_eq!(table.values.len(), MAX_VALUES);
        // Full: new values are answered, unshared, until a quarter of the size came.
        let mut last = None;
        for i in 0..MAX_VALUES / 4 {
            last = Some(get(&mut table, &format!("new-{i}")));
        }
        assert_eq!(&*last.unwrap(), format!("new-{}", MAX_VALUES / 4 - 1));
        // The sweep left the value a holder still has (and the few that came after it).
        assert!(table.values.len() <= 3, "{}", table.values.len());
        assert!(!table.values.contains("gone-0") && table.values.contains("kept"));
        assert!(Arc::ptr_eq(&get(&mut table, "kept"), &kept));
    }
}
