//! Visits per gender, held compactly: the models keep one of these per profile (and MODEL3 one
//! per day of its window), so across millions of profiles their size is the speed layer's
//! memory. A short list sorted by gender, the names shared between profiles, instead of a
//! `BTreeMap<String, u64>` (a node of eleven slots and a string per gender, for the two or
//! three genders a profile has). Stored as the JSON object the map was.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Distinct genders a count holds: `gender` is the client's free text, and state must stay
/// bounded whatever a partner sends (a device's state travels whole in a merge record).
/// Further values are not counted.
pub const MAX_GENDERS: usize = 32;

/// Distinct gender names shared between profiles; beyond it, names are kept per profile (a
/// partner sending a new gender per user cannot grow this table without bound).
const MAX_SHARED_NAMES: usize = 4_096;

/// The shared copy of `name`.
fn shared(name: &str) -> Arc<str> {
    static NAMES: OnceLock<Mutex<HashSet<Arc<str>>>> = OnceLock::new();
    let names = NAMES.get_or_init(Default::default);
    let mut names = names
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(known) = names.get(name) {
        return known.clone();
    }
    let new: Arc<str> = Arc::from(name);
    if names.len() < MAX_SHARED_NAMES {
        names.insert(new.clone());
    }
    new
}

/// Visits per gender, sorted by gender.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenderCounts(Vec<(Arc<str>, u64)>);

impl GenderCounts {
    /// Adds `n` visits of `gender`, unless it is a new gender beyond [`MAX_GENDERS`].
    pub fn add(&mut self, gender: &str, n: u64) {
        match self.0.binary_search_by(|(g, _)| g.as_ref().cmp(gender)) {
            Ok(i) => self.0[i].1 = self.0[i].1.saturating_add(n),
            Err(_) if self.0.len() >= MAX_GENDERS => {}
            Err(i) => self.0.insert(i, (shared(gender), n)),
        }
    }

    /// Every count of `other` added.
    pub fn add_all(&mut self, other: &GenderCounts) {
        for (g, n) in other.iter() {
            self.add(g, n);
        }
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

    /// The gender with the most visits; ties go to the alphabetically first, so answers are
    /// deterministic.
    pub fn top(&self) -> Option<String> {
        let mut best: Option<(&str, u64)> = None;
        for (g, n) in self.iter() {
            if n == 0 {
                continue;
            }
            // Sorted by gender: a later gender wins only with strictly more visits.
            if best.is_none_or(|(_, b)| n > b) {
                best = Some((g, n));
            }
        }
        best.map(|(g, _)| g.to_string())
    }
}

impl Serialize for GenderCounts {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (g, n) in self.iter() {
            map.serialize_entry(g, &n)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for GenderCounts {
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
    fn counts_stay_sorted_bounded_and_shared() {
        let mut c = GenderCounts::default();
        c.add("male", 2);
        c.add("female", 3);
        c.add("male", 1);
        assert_eq!(c.iter().collect::<Vec<_>>(), [("female", 3), ("male", 3)]);
        assert_eq!(
            c.top().as_deref(),
            Some("female"),
            "a tie goes to the first name"
        );
        for i in 0..100 {
            c.add(&format!("g{i}"), 1);
        }
        assert_eq!(c.len(), MAX_GENDERS);
        let mut d = GenderCounts::default();
        d.add("female", 1);
        assert!(Arc::ptr_eq(&c.0[0].0, &d.0[0].0), "one copy of a name");
    }

    #[test]
    fn stored_as_the_map_it_was() {
        let mut c = GenderCounts::default();
        c.add("male", 2);
        c.add("female", 5);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json, serde_json::json!({"female": 5, "male": 2}));
        let back: GenderCounts = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
    }
}
