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
}
