//! MODEL1: the gender of the last gender-bearing page visit.

use chrono::{DateTime, Utc};
use pulse_core::Event;
use serde::{Deserialize, Serialize};

use super::{visit_gender, ProfileModel};
use crate::interned::{self, Shared};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LastGender {
    #[serde(with = "interned::optional")]
    last: Option<Shared>,
}

impl ProfileModel for LastGender {
    const NAME: &'static str = "MODEL1";

    fn fold(&mut self, event: &Event) {
        interned::set_latest(&mut self.last, visit_gender(event));
    }

    fn answer(&self, _now: DateTime<Utc>) -> Option<String> {
        self.last.as_deref().map(str::to_string)
    }

    /// The last visit's gender of whichever profile was seen last, if it has one.
    fn merge(&mut self, other: Self, other_is_newer: bool) {
        if other.last.is_some() && (other_is_newer || self.last.is_none()) {
            self.last = other.last;
        }
    }
}
