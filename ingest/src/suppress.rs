//! Events of erased people (see `pulse_core::erasure`) are left out before anything is
//! written: after an erasure nothing new of the person reaches Kafka from this ingest.

use pulse_core::erasure::Erasures;
use pulse_core::Event;

/// How ingest answers a request that carries an erased person's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ErasedResponse {
    /// Answer as if they were accepted, and write the others (Segment's "suppress": the
    /// person's app goes on sending, and nothing tells it why).
    Drop,
    /// Refuse the whole request with 403, listing the erased person's events; nothing of it
    /// is written, so the client can send the others again.
    Forbid,
}

/// A request's events split into those to write and those of erased people.
#[derive(Debug, Default)]
pub struct Split {
    /// What is written, in request order.
    pub kept: Vec<Event>,
    /// The request index of each kept event; empty when nothing was left out (then it is the
    /// identity).
    pub kept_at: Vec<usize>,
    /// Request index and message id of each event left out.
    pub left_out: Vec<(usize, String)>,
}

impl Split {
    /// The request index of the `i`-th kept event.
    pub fn index_of(&self, i: usize) -> usize {
        self.kept_at.get(i).copied().unwrap_or(i)
    }

    /// Every message id of the request, in request order (kept or left out).
    pub fn message_ids(&self) -> Vec<&str> {
        let mut out: Vec<(usize, &str)> = self
            .kept
            .iter()
            .enumerate()
            .map(|(i, e)| (self.index_of(i), e.message_id.as_str()))
            .chain(self.left_out.iter().map(|(i, id)| (*i, id.as_str())))
            .collect();
        out.sort_unstable_by_key(|(i, _)| *i);
        out.into_iter().map(|(_, id)| id).collect()
    }
}

/// Splits `events` by `erasures`. Free when nothing of any partner is erased.
pub fn split(erasures: &Erasures, events: Vec<Event>) -> Split {
    if erasures.is_empty() || !events.iter().any(|e| erasures.erases(e)) {
        return Split {
            kept: events,
            ..Split::default()
        };
    }
    let mut out = Split::default();
    for (index, event) in events.into_iter().enumerate() {
        if erasures.erases(&event) {
            out.left_out.push((index, event.message_id));
        } else {
            out.kept_at.push(index);
            out.kept.push(event);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulse_core::{parse_event, ParseContext};

    fn event(user: &str, id: &str) -> Event {
        let json = format!(
            r#"{{"event":"page_view","partner_id":"p1","user_id":"{user}","message_id":"{id}"}}"#
        );
        parse_event(&json, &ParseContext::now()).unwrap()
    }

    #[test]
    fn erased_events_are_left_out_and_indices_kept() {
        let mut erasures = Erasures::default();
        let events = vec![event("a", "m0"), event("gone", "m1"), event("b", "m2")];
        let all = split(&erasures, events.clone());
        assert_eq!(all.kept.len(), 3);
        assert!(all.left_out.is_empty());
        assert_eq!(all.index_of(2), 2);
        erasures.insert("p1", "gone");
        let s = split(&erasures, events);
        assert_eq!(s.kept.len(), 2);
        assert_eq!(s.left_out, vec![(1, "m1".to_string())]);
        assert_eq!(
            s.index_of(1),
            2,
            "the second kept event was the request's third"
        );
        assert_eq!(s.message_ids(), vec!["m0", "m1", "m2"]);
    }
}
