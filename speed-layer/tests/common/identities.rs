//! The identity test's stream: people browsing on anonymous devices, logging in on them
//! (links), going on with and without their ids, and client retries; its ground truth, every
//! event in the profile of its person. Shared by the live identity test and the recompute's.

use std::collections::HashMap;

use chrono::Utc;
use pulse_core::{parse_event, Event, ParseContext};
use serde_json::{json, Value};

use super::{ground_truth, Truth};

/// A small deterministic generator (xorshift), so a failing run can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub fn event(v: Value) -> Event {
    parse_event(&v.to_string(), &ParseContext::now()).expect("a valid event")
}

struct Person {
    partner: &'static str,
    user: String,
    gender: &'static str,
    country: &'static str,
    devices: Vec<String>,
    logs_in: bool,
}

/// The events of the identity test, in four phases (before, during and after the logins, and
/// after a rebalance), the retries sent besides them, and who each device belongs to.
pub struct Stream {
    pub phases: Vec<Vec<Event>>,
    pub retries: Vec<Event>,
    /// Device profile id → the person's profile id, for the devices that get merged.
    pub linked: HashMap<String, String>,
}

pub fn identity_stream(people: usize, seed: u64) -> Stream {
    let mut rng = Rng(seed);
    let now = Utc::now().timestamp_millis();
    let seq = std::cell::Cell::new(0u64);
    let next = || {
        seq.set(seq.get() + 1);
        seq.get()
    };
    let visit = |rng: &mut Rng, p: &Person, who: Value, gender: &str| -> Event {
        let seq = next();
        let kind = ["page_view", "product_view", "add_to_cart", "purchase"][rng.below(4) as usize];
        let mut v = json!({
            "event": kind,
            "partner_id": p.partner,
            "message_id": format!("{}-{seq}", p.user),
            "timestamp": now - rng.below(10 * 86_400_000) as i64,
            "country": p.country,
            "category": [format!("c{}", rng.below(30))],
        });
        for (k, val) in who.as_object().unwrap() {
            v[k] = val.clone();
        }
        if kind != "purchase" {
            v["gender"] = json!(gender);
        }
        if kind == "add_to_cart" || kind == "purchase" {
            v["cart_amount"] = json!(format!("{}.{:02}", 1 + rng.below(300), rng.below(100)));
        }
        event(v)
    };
    let persons: Vec<Person> = (0..people)
        .map(|i| Person {
            partner: if i % 2 == 0 { "shop-a" } else { "shop-b" },
            user: format!("user-{i}"),
            gender: if i % 3 == 0 { "male" } else { "female" },
            country: if i % 4 == 0 { "GB" } else { "TR" },
            devices: (0..1 + (i % 3 == 0) as usize)
                .map(|k| format!("device-{i}-{k}"))
                .collect(),
            logs_in: i % 10 < 7,
        })
        .collect();
    let mut phases = vec![Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let mut linked = HashMap::new();
    for p in &persons {
        let anon = |d: &String| json!({"anonymous_id": d});
        let user = json!({"user_id": p.user});
        let other = if p.gender == "male" { "female" } else { "male" };
        // Before: the devices browse anonymously; the person, elsewhere, with either gender.
        for d in &p.devices {
            for _ in 0..2 + rng.below(5) {
                phases[0].push(visit(&mut rng, p, anon(d), p.gender));
            }
        }
        for _ in 0..rng.below(4) {
            let g = if rng.below(2) == 0 { p.gender } else { other };
            phases[0].push(visit(&mut rng, p, user.clone(), g));
        }
        // During: the logins, with the devices still browsing and the person active.
        if p.logs_in {
            for d in &p.devices {
                phases[1].push(event(json!({
                    "event": "identify", "partner_id": p.partner, "user_id": p.user,
                    "anonymous_id": d, "message_id": format!("{}-login-{}", p.user, next()),
                    "country": p.country,
                })));
                linked.insert(
                    format!("{}:{d}", p.partner),
                    format!("{}:{}", p.partner, p.user),
                );
            }
        }
        for d in &p.devices {
            for _ in 0..rng.below(3) {
                phases[1].push(visit(&mut rng, p, anon(d), p.gender));
            }
        }
        phases[1].push(visit(&mut rng, p, user.clone(), p.gender));
        // After: devices go on anonymously (their events now belong to the person if it
        // logged in), the person visits with both ids (logged in) and with the user id alone.
        for phase in [2, 3] {
            for d in &p.devices {
                for _ in 0..1 + rng.below(3) {
                    phases[phase].push(visit(&mut rng, p, anon(d), p.gender));
                }
                if p.logs_in {
                    let both = json!({"user_id": p.user, "anonymous_id": d});
                    phases[phase].push(visit(&mut rng, p, both, p.gender));
                }
            }
            phases[phase].push(visit(&mut rng, p, user.clone(), p.gender));
        }
    }
    // Client retries of events before the logins, sent after them: counted once.
    let retries = phases[0].iter().step_by(7).cloned().collect();
    Stream {
        phases,
        retries,
        linked,
    }
}

/// The ground truth: every event in the profile of its person (a merged device's events in
/// the person's), folded by the test's own code.
pub fn truth_of(stream: &Stream) -> HashMap<String, Truth> {
    truth_until(stream, stream.phases.len(), &[])
}

/// The ground truth of the first `phases` phases, the devices `unlinked` (profile ids) left
/// out of their people: their anonymous events are theirs, as if never linked.
pub fn truth_until(stream: &Stream, phases: usize, unlinked: &[&str]) -> HashMap<String, Truth> {
    let resolved: Vec<Event> = stream.phases[..phases]
        .iter()
        .flatten()
        .map(|e| {
            let mut e = e.clone();
            let device = e.partition_key();
            if e.user_id.is_none() && !unlinked.contains(&device.as_str()) {
                if let Some(person) = stream.linked.get(&device) {
                    e.user_id = Some(person.split_once(':').unwrap().1.to_string());
                }
            }
            e
        })
        .collect();
    ground_truth(&resolved)
}

/// People and unmerged devices (documents without `merged_into`), and the merged devices'
/// pointers (id → person).
pub fn split(docs: &HashMap<String, Value>) -> (HashMap<String, Value>, HashMap<String, String>) {
    let mut people = HashMap::new();
    let mut pointers = HashMap::new();
    for (id, d) in docs {
        match d["merged_into"].as_str() {
            Some(person) => {
                pointers.insert(
                    id.clone(),
                    format!("{}:{person}", d["partner_id"].as_str().unwrap()),
                );
            }
            None => {
                people.insert(id.clone(), d.clone());
            }
        }
    }
    (people, pointers)
}

/// What the alias holds once its people equal `truth`, or after `patience` (the live layer
/// folds on meanwhile): people, pointers, and the differences left (empty when equal).
pub async fn people_once_equal(
    f: &super::Fixture,
    truth: &HashMap<String, Truth>,
    patience: std::time::Duration,
) -> (HashMap<String, Value>, HashMap<String, String>, Vec<String>) {
    let deadline = std::time::Instant::now() + patience;
    loop {
        let (people, pointers) = split(&f.documents().await);
        let problems = super::diff(&people, truth);
        if problems.is_empty() || std::time::Instant::now() > deadline {
            return (people, pointers, problems);
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}
