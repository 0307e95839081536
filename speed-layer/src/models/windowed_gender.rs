//! MODEL3: the gender with the most page visits over the last N days (default 7).
//!
//! State is one bucket of counts per day ([`NamedCounts`]), never a list of events, so it
//! stays small however active the user is. Buckets older than the window are dropped as new days arrive, and the
//! answer ignores them even when the user has been quiet (`now` moves the window).

use std::collections::BTreeMap;

use serde::ser::SerializeMap;
use serde::{Deserializer, Serializer};
use std::sync::atomic::{AtomicU32, Ordering};

use chrono::{DateTime, Utc};
use pulse_core::Event;
use serde::{Deserialize, Serialize};

use super::{count_gender, count_genders, visit_gender, ProfileModel};
use crate::counts::NamedCounts;

/// Window length in days; set once at start-up from configuration.
static WINDOW_DAYS: AtomicU32 = AtomicU32::new(7);

pub fn set_window_days(days: u32) {
    WINDOW_DAYS.store(days.max(1), Ordering::Relaxed);
}

pub fn window_days() -> u32 {
    WINDOW_DAYS.load(Ordering::Relaxed)
}

fn day_of(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(86_400)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WindowedTopGender {
    /// Day number (days since 1970-01-01, UTC) → gender → visits that day.
    days: DayBuckets,
}

/// The day buckets, oldest first: at most the window's days, so a short sorted list rather
/// than a map node. Stored as the JSON object `{"<day>": {gender: visits}}` the map was.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct DayBuckets(Vec<(i64, NamedCounts)>);

impl DayBuckets {
    fn bucket(&mut self, day: i64) -> &mut NamedCounts {
        let i = match self.0.binary_search_by_key(&day, |(d, _)| *d) {
            Ok(i) => i,
            Err(i) => {
                // Exact growth: at most the window's days, and every profile has them.
                self.0.reserve_exact(1);
                self.0.insert(i, (day, NamedCounts::default()));
                i
            }
        };
        &mut self.0[i].1
    }
}

impl Serialize for DayBuckets {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (day, counts) in &self.0 {
            map.serialize_entry(day, counts)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for DayBuckets {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = BTreeMap::<i64, NamedCounts>::deserialize(deserializer)?;
        Ok(Self(stored.into_iter().collect()))
    }
}

impl WindowedTopGender {
    /// First day inside the window that ends on `today`.
    fn window_start(today: i64) -> i64 {
        today - i64::from(window_days()) + 1
    }
}

impl ProfileModel for WindowedTopGender {
    const NAME: &'static str = "MODEL3";

    fn fold(&mut self, event: &Event) {
        let Some(g) = visit_gender(event) else {
            return;
        };
        let day = day_of(event.timestamp);
        count_gender(self.days.bucket(day), g, 1);
        self.expire();
    }

    /// Both profiles' day buckets added day by day, then expired by the newest day either saw.
    fn merge(&mut self, other: Self, _other_is_newer: bool) {
        for (day, counts) in &other.days.0 {
            count_genders(self.days.bucket(*day), counts);
        }
        self.expire();
    }

    fn answer(&self, now: DateTime<Utc>) -> Option<String> {
        let today = day_of(now);
        let start = Self::window_start(today);
        // Not capped like a day's bucket: the days together may name more genders.
        let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
        for (_, counts) in self
            .days
            .0
            .iter()
            .filter(|(d, _)| (start..=today).contains(d))
        {
            for (g, n) in counts.iter() {
                let total = totals.entry(g).or_default();
                *total = total.saturating_add(n);
            }
        }
        crate::counts::top(totals.into_iter())
    }
}

impl WindowedTopGender {
    /// Drops the buckets before the window that ends on the newest day seen: state never
    /// outgrows the window.
    fn expire(&mut self) {
        let days = &mut self.days.0;
        if let (Some((oldest, _)), Some((newest, _))) = (days.first(), days.last()) {
            let start = Self::window_start(*newest);
            if *oldest < start {
                days.retain(|(d, _)| *d >= start);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use pulse_core::{parse_event, ParseContext};

    fn visit(gender: &str, day: u32) -> Event {
        let json = format!(
            r#"{{"event":"product_view","partner_id":"p","user_id":"u","gender":"{gender}","timestamp":"2026-11-{day:02}T12:00:00Z"}}"#
        );
        parse_event(&json, &ParseContext::now()).unwrap()
    }

    #[test]
    fn window_moves_and_expires() {
        let mut m = WindowedTopGender::default();
        for _ in 0..5 {
            m.fold(&visit("male", 1));
        }
        for _ in 0..2 {
            m.fold(&visit("female", 6));
        }
        let at = |d| Utc.with_ymd_and_hms(2026, 11, d, 18, 0, 0).unwrap();
        assert_eq!(m.answer(at(7)).as_deref(), Some("male"));
        // On the 8th, the 1st is outside the 7-day window [2..8].
        assert_eq!(m.answer(at(8)).as_deref(), Some("female"));
        // Much later, nothing is left in the window.
        assert_eq!(m.answer(at(20)), None);
        // A new day's visit drops the buckets that fell out of the window.
        m.fold(&visit("male", 12));
        assert_eq!(m.days.0.len(), 2, "{:?}", m.days);
    }

    #[test]
    fn a_merge_adds_day_by_day_and_expires_by_the_newest_day() {
        let mut person = WindowedTopGender::default();
        person.fold(&visit("male", 10));
        person.fold(&visit("male", 12));
        let mut device = WindowedTopGender::default();
        for _ in 0..2 {
            device.fold(&visit("female", 12));
        }
        device.fold(&visit("female", 1));
        ProfileModel::merge(&mut person, device, true);
        let day = |d: i64| {
            person
                .days
                .0
                .iter()
                .find(|(x, _)| *x == d)
                .map(|(_, c)| c.len())
        };
        assert_eq!(day(day_of(visit("x", 12).timestamp)), Some(2));
        assert_eq!(day(day_of(visit("x", 1).timestamp)), None, "expired");
        let at = Utc.with_ymd_and_hms(2026, 11, 12, 18, 0, 0).unwrap();
        // male 2 (days 10, 12) against female 2 (day 12): the tie goes to "female".
        assert_eq!(person.answer(at).as_deref(), Some("female"));
    }

    #[test]
    fn stored_as_the_map_of_days_it_was() {
        let stored =
            serde_json::json!({"days": {"20400": {"female": 3, "male": 1}, "20401": {"male": 2}}});
        let m: WindowedTopGender = serde_json::from_value(stored.clone()).unwrap();
        assert_eq!(m.days.0.len(), 2);
        assert_eq!(serde_json::to_value(&m).unwrap(), stored);
    }
}
