//! Realistic clickstream ([`Clickstream`]): users are Zipf-distributed (a few heavy users, a
//! long tail), each visit is a session that walks page_view → product_view → add_to_cart →
//! purchase with drop-off at each step, and locales are Turkish and English as in the seed's
//! sample profile. Several sessions are in flight at once, so events of different users
//! interleave as they do in production.

use std::collections::VecDeque;
use std::io::Write;

use chrono::Utc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde_json::{json, Map, Value};

/// A partner the generator writes for, with its write key.
#[derive(Debug, Clone)]
pub struct Partner {
    pub id: String,
    pub key: String,
}

/// One generated event, with the write key of its partner.
#[derive(Debug, Clone)]
pub struct Generated {
    pub partner: usize,
    pub event: Value,
}

struct Category {
    name: &'static str,
    gender: Option<&'static str>,
    price_range: (u32, u32),
}

const CATEGORIES_TR: &[Category] = &[
    Category {
        name: "Kadın Giyim",
        gender: Some("female"),
        price_range: (99, 1499),
    },
    Category {
        name: "Erkek Giyim",
        gender: Some("male"),
        price_range: (149, 1999),
    },
    Category {
        name: "Kadın Ayakkabı",
        gender: Some("female"),
        price_range: (299, 2499),
    },
    Category {
        name: "Erkek Ayakkabı",
        gender: Some("male"),
        price_range: (299, 2999),
    },
    Category {
        name: "Elektronik",
        gender: None,
        price_range: (499, 39999),
    },
    Category {
        name: "Ev & Yaşam",
        gender: None,
        price_range: (49, 4999),
    },
    Category {
        name: "Kozmetik",
        gender: Some("female"),
        price_range: (39, 899),
    },
];

const CATEGORIES_EN: &[Category] = &[
    Category {
        name: "Women's Clothing",
        gender: Some("female"),
        price_range: (10, 150),
    },
    Category {
        name: "Men's Clothing",
        gender: Some("male"),
        price_range: (12, 180),
    },
    Category {
        name: "Women's Shoes",
        gender: Some("female"),
        price_range: (25, 220),
    },
    Category {
        name: "Men's Shoes",
        gender: Some("male"),
        price_range: (30, 250),
    },
    Category {
        name: "Electronics",
        gender: None,
        price_range: (20, 1500),
    },
    Category {
        name: "Home & Living",
        gender: None,
        price_range: (5, 400),
    },
    Category {
        name: "Beauty",
        gender: Some("female"),
        price_range: (4, 90),
    },
];

const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
    "PulseSDK/3.2.1 (Android 13; tr_TR)",
];

const SEARCH_TR: &[&str] = &[
    "elbise",
    "spor ayakkabı",
    "kulaklık",
    "mont",
    "parfüm",
    "çanta",
];
const SEARCH_EN: &[&str] = &[
    "dress",
    "sneakers",
    "headphones",
    "jacket",
    "perfume",
    "bag",
];

/// Settings of the generator.
#[derive(Debug, Clone)]
pub struct ClickstreamConfig {
    pub partners: Vec<Partner>,
    /// Distinct users per partner.
    pub users: u64,
    /// Zipf exponent of user popularity.
    pub zipf_exponent: f64,
    /// Sessions in flight at once (interleaving).
    pub concurrent_sessions: usize,
    pub seed: u64,
    /// Share of users (0 to 1) who browse on a device of theirs anonymously and log in on it
    /// now and then: every event of theirs carries the device's `anonymous_id`, and about half
    /// their sessions are logged in (`user_id` too), so the speed layer links the device to
    /// them at their first logged-in session. 0: each user is either logged in or anonymous.
    pub login_share: f64,
}

/// An endless stream of clickstream events.
pub struct Clickstream {
    config: ClickstreamConfig,
    rng: StdRng,
    zipf: Zipf<f64>,
    sessions: Vec<VecDeque<Generated>>,
}

impl Clickstream {
    pub fn new(config: ClickstreamConfig) -> Self {
        assert!(
            !config.partners.is_empty(),
            "clickstream needs at least one partner"
        );
        let zipf = Zipf::new(config.users.max(1) as f64, config.zipf_exponent)
            .unwrap_or_else(|_| Zipf::new(1.0, 1.0).expect("valid zipf"));
        Self {
            rng: StdRng::seed_from_u64(config.seed),
            zipf,
            sessions: Vec::new(),
            config,
        }
    }

    fn new_session(&mut self) -> VecDeque<Generated> {
        let rng = &mut self.rng;
        let partner = rng.random_range(0..self.config.partners.len());
        let partner_id = self.config.partners[partner].id.clone();
        let user_n = self.zipf.sample(rng) as u64;
        // A user's locale and device are stable: derived from the user, not drawn per session.
        let turkish = (user_n * 7 + partner as u64) % 10 < 7;
        let (country, language, categories, searches, host) = if turkish {
            (
                "TR",
                "tr",
                CATEGORIES_TR,
                SEARCH_TR,
                format!("https://www.{partner_id}.com.tr"),
            )
        } else {
            let country = if user_n.is_multiple_of(3) { "US" } else { "GB" };
            (
                country,
                "en",
                CATEGORIES_EN,
                SEARCH_EN,
                format!("https://www.{partner_id}.com"),
            )
        };
        let user_agent = USER_AGENTS[(user_n as usize) % USER_AGENTS.len()];
        let anonymous = user_n % 10 == 9;
        // Decided per user (not drawn), and no draw at all without logins, so a stream without
        // them is the same as before they existed.
        let logs_in = !anonymous
            && self.config.login_share > 0.0
            && (user_n.wrapping_mul(2_654_435_761) + partner as u64) % 1000
                < (self.config.login_share * 1000.0) as u64;
        let logged_in = !logs_in || rng.random_bool(0.5);
        let session_id = format!("s-{:016x}", rng.random::<u64>());
        let referrer = [
            "https://www.google.com/",
            "https://www.instagram.com/",
            "",
            "https://t.co/x",
        ][rng.random_range(0..4)];

        let mut base = Map::new();
        base.insert("partner_id".into(), json!(partner_id));
        base.insert("partner_name".into(), json!(partner_id.to_uppercase()));
        if anonymous {
            base.insert("anonymous_id".into(), json!(format!("anon-{user_n}")));
        } else if logged_in {
            base.insert("user_id".into(), json!(format!("u{user_n}")));
        }
        if logs_in {
            base.insert("anonymous_id".into(), json!(format!("device-{user_n}")));
        }
        base.insert("session_id".into(), json!(session_id));
        base.insert("country".into(), json!(country));
        base.insert("language".into(), json!(language));
        base.insert("version".into(), json!("3.2.1"));
        base.insert("user_agent".into(), json!(user_agent));
        if !referrer.is_empty() {
            base.insert("referrer".into(), json!(referrer));
        }

        let mut steps: Vec<Map<String, Value>> = Vec::new();
        let mut step = |event: &str, fields: Vec<(&str, Value)>| {
            let mut m = base.clone();
            m.insert("event".into(), json!(event));
            for (k, v) in fields {
                m.insert(k.into(), v);
            }
            steps.push(m);
        };
        step(
            "page_view",
            vec![
                ("page_type", json!("home")),
                ("current_url", json!(format!("{host}/"))),
            ],
        );
        let category = &categories[rng.random_range(0..categories.len())];
        if rng.random_bool(0.3) {
            let q = searches[rng.random_range(0..searches.len())];
            step(
                "search",
                vec![
                    ("search_query", json!(q)),
                    ("current_url", json!(format!("{host}/search?q={q}"))),
                ],
            );
        }
        let gender_fields = |m: &mut Vec<(&str, Value)>| {
            if let Some(g) = category.gender {
                m.push(("gender", json!(g)));
            }
        };
        let mut cat = vec![
            ("page_type", json!("category")),
            ("category", json!(category.name)),
        ];
        gender_fields(&mut cat);
        cat.push((
            "current_url",
            json!(format!("{host}/c/{}", slug(category.name))),
        ));
        step("page_view", cat);
        let views = rng.random_range(1..=4);
        let mut last_price = 0u32;
        let mut last_product = String::new();
        for _ in 0..views {
            last_product = format!("p{}", rng.random_range(1..50_000));
            last_price = rng.random_range(category.price_range.0..=category.price_range.1);
            let mut f = vec![
                ("page_type", json!("product")),
                ("category", json!([category.name])),
                ("product_id", json!(last_product)),
                ("current_url", json!(format!("{host}/p/{last_product}"))),
            ];
            gender_fields(&mut f);
            step("product_view", f);
        }
        if rng.random_bool(0.35) {
            let cents = rng.random_range(0..100);
            let amount = format!("{last_price}.{cents:02}");
            step(
                "add_to_cart",
                vec![
                    ("product_id", json!(last_product)),
                    ("category", json!([category.name])),
                    ("cart_amount", json!(amount)),
                ],
            );
            if rng.random_bool(0.4) {
                step(
                    "purchase",
                    vec![
                        ("cart_amount", json!(amount)),
                        ("category", json!([category.name])),
                    ],
                );
            }
        }
        if let Some(first) = steps.first_mut() {
            first.insert("init_session".into(), json!(true));
        }
        steps
            .into_iter()
            .map(|m| Generated {
                partner,
                event: Value::Object(m),
            })
            .collect()
    }
}

impl Iterator for Clickstream {
    type Item = Generated;

    fn next(&mut self) -> Option<Generated> {
        while self.sessions.len() < self.config.concurrent_sessions.max(1) {
            let s = self.new_session();
            self.sessions.push(s);
        }
        let i = self.rng.random_range(0..self.sessions.len());
        let mut item = self.sessions[i].pop_front()?;
        if self.sessions[i].is_empty() {
            self.sessions.swap_remove(i);
        }
        // Stamped when emitted, so the stream's times move forward like a real one.
        if let Value::Object(m) = &mut item.event {
            m.insert("message_id".into(), json!(uuid::Uuid::new_v4().to_string()));
            m.insert("timestamp".into(), json!(Utc::now().timestamp_millis()));
        }
        Some(item)
    }
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// Writes `n` generated events as NDJSON (for replaying with other tools, or as ground truth).
pub fn write_ndjson(stream: ClickstreamConfig, n: u64, mut out: impl Write) -> std::io::Result<()> {
    for g in Clickstream::new(stream).take(n as usize) {
        serde_json::to_writer(&mut out, &g.event)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use pulse_core::{parse_event, ParseContext};

    fn config() -> ClickstreamConfig {
        ClickstreamConfig {
            partners: vec![
                Partner {
                    id: "a".into(),
                    key: "ka".into(),
                },
                Partner {
                    id: "b".into(),
                    key: "kb".into(),
                },
            ],
            users: 1000,
            zipf_exponent: 1.1,
            concurrent_sessions: 16,
            seed: 7,
            login_share: 0.0,
        }
    }

    /// Everything generated is a valid event, and the funnel's shape is plausible.
    #[test]
    fn generates_valid_funnel() {
        let ctx = ParseContext::now();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for g in Clickstream::new(config()).take(5000) {
            let e = parse_event(&g.event.to_string(), &ctx).expect("generated event parses");
            assert_eq!(e.partner_id, config().partners[g.partner].id);
            *counts.entry(e.event).or_default() += 1;
        }
        let views = counts["product_view"];
        let carts = counts.get("add_to_cart").copied().unwrap_or(0);
        let purchases = counts.get("purchase").copied().unwrap_or(0);
        assert!(
            views > carts && carts > purchases && purchases > 0,
            "{counts:?}"
        );
    }

    /// With logins, a share of users send events of their device anonymously and, in other
    /// sessions, logged in with the device's id beside their user id.
    #[test]
    fn some_users_log_in_on_their_devices() {
        let ctx = ParseContext::now();
        let stream = Clickstream::new(ClickstreamConfig {
            login_share: 0.3,
            ..config()
        });
        let (mut device_only, mut both, mut users) = (0, 0, std::collections::HashSet::new());
        for g in stream.take(20_000) {
            let e = parse_event(&g.event.to_string(), &ctx).expect("generated event parses");
            match (&e.user_id, &e.anonymous_id) {
                (Some(u), Some(d)) => {
                    assert_eq!(d, &format!("device-{}", &u[1..]));
                    both += 1;
                    users.insert(u.clone());
                }
                (None, Some(d)) if d.starts_with("device-") => device_only += 1,
                _ => {}
            }
        }
        assert!(device_only > 1000 && both > 1000, "{device_only} {both}");
        assert!(users.len() > 50, "{}", users.len());
    }

    /// Same seed, same users and sessions (message ids and times aside).
    #[test]
    fn deterministic_per_seed() {
        let strip = |mut v: Value| {
            v.as_object_mut().unwrap().remove("message_id");
            v.as_object_mut().unwrap().remove("timestamp");
            v
        };
        let a: Vec<Value> = Clickstream::new(config())
            .take(100)
            .map(|g| strip(g.event))
            .collect();
        let b: Vec<Value> = Clickstream::new(config())
            .take(100)
            .map(|g| strip(g.event))
            .collect();
        assert_eq!(a, b);
    }
}
