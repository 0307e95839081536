//! MODEL2: the gender with the most page visits so far.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use pulse_core::Event;
use serde::{Deserialize, Serialize};

use super::{top, visit_gender, ProfileModel};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TopGender {
    counts: BTreeMap<String, u64>,
}

impl ProfileModel for TopGender {
    fn fold(&mut self, event: &Event) {
        if let Some(g) = visit_gender(event) {
            match self.counts.get_mut(g) {
                Some(n) => *n = n.saturating_add(1),
                None => {
                    self.counts.insert(g.to_string(), 1);
                }
            }
        }
    }

    fn answer(&self, _now: DateTime<Utc>) -> Option<String> {
        top(self.counts.iter().map(|(k, n)| (k, *n)))
    }

    /// Visits of both profiles, added per gender.
    fn merge(&mut self, other: Self, _other_is_newer: bool) {
        for (g, n) in other.counts {
            let total = self.counts.entry(g).or_default();
            *total = total.saturating_add(n);
        }
    }
}
