//! MODEL1: the gender of the last gender-bearing page visit.

use chrono::{DateTime, Utc};
use pulse_core::Event;
use serde::{Deserialize, Serialize};

use super::{visit_gender, ProfileModel};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LastGender {
    last: Option<String>,
}

impl ProfileModel for LastGender {
    fn fold(&mut self, event: &Event) {
        if let Some(g) = visit_gender(event) {
            self.last = Some(g.to_string());
        }
    }

    fn answer(&self, _now: DateTime<Utc>) -> Option<String> {
        self.last.clone()
    }

    /// The last visit's gender of whichever profile was seen last, if it has one.
    fn merge(&mut self, other: Self, other_is_newer: bool) {
        if other.last.is_some() && (other_is_newer || self.last.is_none()) {
            self.last = other.last;
        }
    }
}
