//! Counts by name, held compactly: every profile keeps its event counts by type, and the
//! gender models their visits by gender (MODEL3 one per day of its window), so across millions
//! of profiles their size is the speed layer's memory. A short list sorted by name, the names
//! shared between profiles, instead of a `BTreeMap<String, u64>` (a node of eleven slots and a
//! string per name, for the few names a profile has). Stored as the JSON object the map was.

use std::collections::BTreeMap;

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::interned::{intern, Shared};

/// Counts by name, sorted by name. What may be counted (how many names) is the caller's rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamedCounts(Vec<(Shared, u64)>);

impl NamedCounts {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(g, _)| g.as_ref().cmp(name))
    }

    /// Adds `n` to `name`'s count (saturating), starting it if it is new.
    pub fn add(&mut self, name: &str, n: u64) {
        match self.find(name) {
            Ok(i) => self.0[i].1 = self.0[i].1.saturating_add(n),
            Err(i) => {
                // Exact growth: a profile has a few names, and a new one is rare.
                self.0.reserve_exact(1);
                self.0.insert(i, (intern(name), n));
            }
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.find(name).ok().map(|i| self.0[i].1)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(g, _)| g.as_ref())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(g, n)| (g.as_ref(), *n))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name with the highest count (see [`top`]).
    pub fn top(&self) -> Option<String> {
        top(self.iter())
    }
}

/// The name with the highest count among `counts`, given sorted by name; ties go to the
/// alphabetically first, so answers are deterministic. Zero counts never win.
pub fn top<'a>(counts: impl Iterator<Item = (&'a str, u64)>) -> Option<String> {
    let mut best: Option<(&str, u64)> = None;
    for (name, n) in counts {
        // Sorted by name: a later name wins only with strictly more.
        if n > 0 && best.is_none_or(|(_, b)| n > b) {
            best = Some((name, n));
        }
    }
    best.map(|(name, _)| name.to_string())
}

impl Serialize for NamedCounts {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (g, n) in self.iter() {
            map.serialize_entry(g, &n)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for NamedCounts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = BTreeMap::<String, u64>::deserialize(deserializer)?;
        let mut out = Self::default();
        for (g, n) in stored {
            out.add(&g, n);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_stay_sorted_and_shared() {
        let mut c = NamedCounts::default();
        c.add("male", 2);
        c.add("female", 3);
        c.add("male", 1);
        assert_eq!(c.iter().collect::<Vec<_>>(), [("female", 3), ("male", 3)]);
        assert_eq!(
            c.top().as_deref(),
            Some("female"),
            "a tie goes to the first name"
        );
        assert_eq!((c.get("male"), c.get("x")), (Some(3), None));
        let mut d = NamedCounts::default();
        d.add("female", 1);
        assert!(
            std::sync::Arc::ptr_eq(&c.0[0].0, &d.0[0].0),
            "one copy of a name"
        );
    }

    #[test]
    fn stored_as_the_map_it_was() {
        let mut c = NamedCounts::default();
        c.add("male", 2);
        c.add("female", 5);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json, serde_json::json!({"female": 5, "male": 2}));
        let back: NamedCounts = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
    }
}
