//! The profiles in memory: which partition each belongs to, which are dirty (folded since
//! their last write), and which may be evicted.
//!
//! A dirty profile is never evicted: it is not in the store yet, and dropping it would lose
//! the events folded into it since the last flush (the commit that would re-read them may
//! have moved on). Only a revocation or a re-read drops dirty profiles, together with the
//! positions, so that those events are read again.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::profile::{Fold, Profile};

struct Entry {
    profile: Profile,
    partition: i32,
    dirty: bool,
    touched: Instant,
}

#[derive(Default)]
pub(crate) struct ProfileCache {
    /// Keys are user ids from the outside: ahash is fast and keyed per process.
    entries: HashMap<String, Entry, ahash::RandomState>,
    dirty: usize,
}

impl ProfileCache {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// How many profiles wait for a flush.
    pub fn dirty(&self) -> usize {
        self.dirty
    }

    pub fn contains(&self, id: &str) -> bool {
        self.entries.contains_key(id)
    }

    pub fn get(&self, id: &str) -> Option<&Profile> {
        self.entries.get(id).map(|e| &e.profile)
    }

    /// The profile `id` to change outside a fold: the caller makes it dirty
    /// ([`Self::redirty`]) if it changed anything.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Profile> {
        self.entries.get_mut(id).map(|e| &mut e.profile)
    }

    /// A profile read from the store: clean, of the partition of its watermark.
    pub fn insert_loaded(&mut self, id: String, profile: Profile, now: Instant) {
        let partition = profile.watermark.map_or(-1, |w| w.partition);
        let entry = Entry {
            profile,
            partition,
            dirty: false,
            touched: now,
        };
        if let Some(old) = self.entries.insert(id, entry) {
            if old.dirty {
                self.dirty -= 1;
            }
        }
    }

    /// Folds into the profile `id` (made by `create` when it is new) with `fold`; an applied
    /// fold makes it dirty. The profile belongs to `partition` from now on: the one its
    /// events come from.
    pub fn fold(
        &mut self,
        id: String,
        partition: i32,
        now: Instant,
        create: impl FnOnce() -> Profile,
        fold: impl FnOnce(&mut Profile) -> Fold,
    ) -> Fold {
        let entry = self.entries.entry(id).or_insert_with(|| Entry {
            profile: create(),
            partition,
            dirty: false,
            touched: now,
        });
        entry.touched = now;
        entry.partition = partition;
        let outcome = fold(&mut entry.profile);
        if outcome == Fold::Applied && !entry.dirty {
            entry.dirty = true;
            self.dirty += 1;
        }
        outcome
    }

    /// The dirty profiles of `partitions`, made clean, each turned into what `write` makes of
    /// it, with its partition.
    pub fn take_dirty<T>(
        &mut self,
        partitions: &HashSet<i32>,
        mut write: impl FnMut(&Profile) -> T,
    ) -> Vec<(T, i32)> {
        let mut out = Vec::new();
        for entry in self.entries.values_mut() {
            if entry.dirty && partitions.contains(&entry.partition) {
                entry.dirty = false;
                out.push((write(&entry.profile), entry.partition));
            }
        }
        self.dirty -= out.len();
        out
    }

    /// Drops the profile `id`, dirty or not (an erased person's); whether it was held.
    pub fn remove(&mut self, id: &str) -> bool {
        match self.entries.remove(id) {
            Some(entry) => {
                if entry.dirty {
                    self.dirty -= 1;
                }
                true
            }
            None => false,
        }
    }

    /// A profile whose write failed: dirty again, so the next flush writes it.
    pub fn redirty(&mut self, id: &str) {
        if let Some(entry) = self.entries.get_mut(id) {
            if !entry.dirty {
                entry.dirty = true;
                self.dirty += 1;
            }
        }
    }

    /// Drops every profile of `partitions`, dirty ones included; returns (dropped, dirty).
    pub fn forget(&mut self, partitions: &[i32]) -> (usize, usize) {
        let gone: HashSet<i32> = partitions.iter().copied().collect();
        let before = self.entries.len();
        let mut dirty_dropped = 0;
        self.entries.retain(|_, e| {
            let keep = !gone.contains(&e.partition);
            if !keep && e.dirty {
                dirty_dropped += 1;
            }
            keep
        });
        self.dirty -= dirty_dropped;
        (before - self.entries.len(), dirty_dropped)
    }

    /// Evicts clean profiles untouched for `idle`, then the least recently touched clean ones
    /// beyond `max`; returns how many went. Dirty profiles stay, even beyond `max`.
    pub fn evict(&mut self, idle: Duration, max: usize, now: Instant) -> usize {
        let before = self.entries.len();
        self.entries
            .retain(|_, e| e.dirty || now.saturating_duration_since(e.touched) < idle);
        if self.entries.len() > max {
            let mut clean: Vec<(Instant, String)> = self
                .entries
                .iter()
                .filter(|(_, e)| !e.dirty)
                .map(|(k, e)| (e.touched, k.clone()))
                .collect();
            clean.sort();
            let excess = self.entries.len() - max;
            for (_, k) in clean.into_iter().take(excess) {
                self.entries.remove(&k);
            }
        }
        before - self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedupe::DedupePolicy;
    use crate::profile::Watermark;
    use pulse_core::Event;

    fn event(user: &str) -> Event {
        let json = format!(r#"{{"event":"page_view","partner_id":"p1","user_id":"{user}"}}"#);
        pulse_core::parse_event(&json, &pulse_core::ParseContext::now()).expect("a valid event")
    }

    /// Folds one event of `user` at `offset` of `partition`, touched `at`.
    fn fold(cache: &mut ProfileCache, user: &str, partition: i32, offset: i64, at: Instant) {
        let e = event(user);
        let outcome = cache.fold(
            e.partition_key(),
            partition,
            at,
            || Profile::new(&e, &[]),
            |p| {
                p.fold(
                    &e,
                    Watermark { partition, offset },
                    &DedupePolicy::default(),
                )
            },
        );
        assert_eq!(outcome, Fold::Applied);
    }

    #[test]
    fn a_dirty_profile_is_never_evicted_not_even_beyond_the_bound() {
        let t0 = Instant::now();
        let mut cache = ProfileCache::default();
        fold(&mut cache, "a", 0, 1, t0);
        fold(&mut cache, "b", 0, 2, t0);
        fold(&mut cache, "c", 1, 3, t0);
        assert_eq!(cache.dirty(), 3);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(cache.evict(Duration::from_secs(1), 0, later), 0);
        assert_eq!(cache.len(), 3);
        // Once written (clean), the same profiles go.
        let taken = cache.take_dirty(&HashSet::from([0, 1]), |p| p.id.clone());
        assert_eq!(taken.len(), 3);
        assert_eq!(cache.dirty(), 0);
        assert_eq!(cache.evict(Duration::from_secs(1), 0, later), 3);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn beyond_the_bound_the_least_recently_touched_clean_profiles_go_first() {
        let t0 = Instant::now();
        let mut cache = ProfileCache::default();
        for (i, user) in ["old", "mid", "new"].iter().enumerate() {
            fold(
                &mut cache,
                user,
                0,
                i as i64,
                t0 + Duration::from_secs(i as u64),
            );
        }
        cache.take_dirty(&HashSet::from([0]), |_| ());
        fold(&mut cache, "dirty", 0, 9, t0);
        let idle = Duration::from_secs(3600);
        assert_eq!(cache.evict(idle, 2, t0 + Duration::from_secs(5)), 2);
        assert!(cache.contains("p1:new"));
        assert!(cache.contains("p1:dirty"));
    }

    #[test]
    fn a_failed_write_makes_the_profile_dirty_again_once() {
        let t0 = Instant::now();
        let mut cache = ProfileCache::default();
        fold(&mut cache, "a", 0, 1, t0);
        cache.take_dirty(&HashSet::from([0]), |_| ());
        cache.redirty("p1:a");
        cache.redirty("p1:a");
        assert_eq!(cache.dirty(), 1);
        // Only the partitions asked for are taken.
        assert!(cache.take_dirty(&HashSet::from([1]), |_| ()).is_empty());
        assert_eq!(cache.dirty(), 1);
    }

    #[test]
    fn forgetting_a_partition_drops_its_dirty_profiles_and_their_count() {
        let t0 = Instant::now();
        let mut cache = ProfileCache::default();
        fold(&mut cache, "a", 0, 1, t0);
        fold(&mut cache, "b", 1, 2, t0);
        assert_eq!(cache.forget(&[1]), (1, 1));
        assert_eq!(cache.dirty(), 1);
        assert!(cache.contains("p1:a"));
    }
}
