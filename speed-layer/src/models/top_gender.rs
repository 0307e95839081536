//! MODEL2: the gender with the most page visits so far.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use pulse_core::Event;
use serde::{Deserialize, Serialize};

use super::{count_gender, top, visit_gender, ProfileModel};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TopGender {
    counts: BTreeMap<String, u64>,
}

impl ProfileModel for TopGender {
    fn fold(&mut self, event: &Event) {
        if let Some(g) = visit_gender(event) {
            count_gender(&mut self.counts, g, 1);
        }
    }

    fn answer(&self, _now: DateTime<Utc>) -> Option<String> {
        top(self.counts.iter().map(|(k, n)| (k, *n)))
    }

    /// Visits of both profiles, added per gender.
    fn merge(&mut self, other: Self, _other_is_newer: bool) {
        for (g, n) in other.counts {
            count_gender(&mut self.counts, &g, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::MAX_GENDERS;
    use pulse_core::{parse_event, ParseContext};

    #[test]
    fn a_flood_of_distinct_genders_keeps_state_bounded() {
        let mut m = TopGender::default();
        for i in 0..(MAX_GENDERS + 50) {
            let e = parse_event(
                &format!(
                    r#"{{"event":"page_view","partner_id":"p","user_id":"u","gender":"g{i}"}}"#
                ),
                &ParseContext::now(),
            )
            .unwrap();
            ProfileModel::fold(&mut m, &e);
        }
        assert_eq!(m.counts.len(), MAX_GENDERS);
        let mut other = TopGender::default();
        other.counts.insert("extra".into(), 9);
        other.counts.insert("g0".into(), 1);
        ProfileModel::merge(&mut m, other, false);
        assert_eq!(
            m.counts.len(),
            MAX_GENDERS,
            "a merge adds no gender beyond the cap"
        );
        assert_eq!(m.counts["g0"], 2);
    }
}
