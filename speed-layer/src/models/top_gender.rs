//! MODEL2: the gender with the most page visits so far.

use chrono::{DateTime, Utc};
use pulse_core::Event;
use serde::{Deserialize, Serialize};

use super::{count_gender, count_genders, visit_gender, ProfileModel};
use crate::counts::NamedCounts;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TopGender {
    counts: NamedCounts,
}

impl ProfileModel for TopGender {
    const NAME: &'static str = "MODEL2";

    fn fold(&mut self, event: &Event) {
        if let Some(g) = visit_gender(event) {
            count_gender(&mut self.counts, g, 1);
        }
    }

    fn answer(&self, _now: DateTime<Utc>) -> Option<String> {
        self.counts.top()
    }

    /// Visits of both profiles, added per gender.
    fn merge(&mut self, other: Self, _other_is_newer: bool) {
        count_genders(&mut self.counts, &other.counts);
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
        count_gender(&mut other.counts, "extra", 9);
        count_gender(&mut other.counts, "g0", 1);
        ProfileModel::merge(&mut m, other, false);
        assert_eq!(
            m.counts.len(),
            MAX_GENDERS,
            "a merge adds no gender beyond the cap"
        );
        assert_eq!(m.counts.iter().find(|(g, _)| *g == "g0"), Some(("g0", 2)));
    }
}
