//! Realistic clickstream, and a load runner that posts it to ingest over HTTP.
//!
//! Users are Zipf-distributed (a few heavy users, a long tail), each visit is a session that
//! walks page_view → product_view → add_to_cart → purchase with drop-off at each step, and
//! locales are Turkish and English as in the seed's sample profile. Several sessions are in
//! flight at once, so events of different users interleave as they do in production.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, Mutex};

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
        } else {
            base.insert("user_id".into(), json!(format!("u{user_n}")));
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

/// Settings of a load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Base URL of ingest, e.g. `http://localhost:8080`.
    pub url: String,
    pub stream: ClickstreamConfig,
    /// Stop after this many events (None: run for `duration`).
    pub events: Option<u64>,
    pub duration: Option<Duration>,
    /// Events per second; 0 = as fast as the service answers.
    pub rate: f64,
    /// Events per request (1 sends single-event POSTs).
    pub batch: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Generate every body before the clock starts, so generation does not share the CPU with
    /// the service under test. Needs `events`.
    pub pregenerate: bool,
}

/// What a load run achieved.
#[derive(Debug)]
pub struct LoadReport {
    pub events_sent: u64,
    pub events_accepted: u64,
    pub requests: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub transport_errors: u64,
    pub elapsed: Duration,
    /// Request latency in microseconds. Under a rate it counts from the request's scheduled
    /// start, so a stalled service shows up in the tail instead of hiding behind a slower send
    /// rate; without one, from when a worker sends it.
    pub latency_us: Histogram<u64>,
}

impl LoadReport {
    pub fn events_per_sec(&self) -> f64 {
        self.events_accepted as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn summary(&self) -> String {
        let q = |p: f64| self.latency_us.value_at_quantile(p) as f64 / 1000.0;
        format!(
            "sent {} events in {} requests over {:.2}s: {} accepted ({:.0} events/s); statuses {:?}; transport errors {}; latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
            self.events_sent,
            self.requests,
            self.elapsed.as_secs_f64(),
            self.events_accepted,
            self.events_per_sec(),
            self.statuses,
            self.transport_errors,
            q(0.5),
            q(0.9),
            q(0.99),
            self.latency_us.max() as f64 / 1000.0
        )
    }
}

struct Request {
    key: String,
    body: Vec<u8>,
    events: u64,
    /// When the request was due, under a rate; None: as soon as a worker takes it.
    scheduled: Option<Instant>,
}

#[derive(Default)]
struct Tally {
    sent: u64,
    accepted: u64,
    requests: u64,
    statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
}

/// Builds request bodies from the stream: one partner per request, since a write key only
/// writes its own partner's events.
struct Batcher {
    stream: Clickstream,
    batch: usize,
    pending: Vec<Vec<Value>>,
}

impl Batcher {
    fn new(config: &LoadConfig) -> Self {
        Self {
            pending: vec![Vec::new(); config.stream.partners.len()],
            stream: Clickstream::new(config.stream.clone()),
            batch: config.batch.max(1),
        }
    }

    fn next_request(&mut self) -> (usize, Vec<u8>, u64) {
        loop {
            let Some(g) = self.stream.next() else {
                continue;
            };
            let buf = &mut self.pending[g.partner];
            buf.push(g.event);
            if buf.len() >= self.batch {
                let events = std::mem::take(buf);
                let n = events.len() as u64;
                let body = if n == 1 {
                    serde_json::to_vec(&events[0])
                } else {
                    serde_json::to_vec(&events)
                };
                return (g.partner, body.unwrap_or_default(), n);
            }
        }
    }
}

/// Runs the load and reports. Errors only for setup problems; failed requests are counted.
pub async fn run(config: LoadConfig) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(
        !config.stream.partners.is_empty(),
        "no partners/write keys given"
    );
    anyhow::ensure!(
        config.events.is_some() || config.duration.is_some(),
        "give a number of events or a duration"
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(config.concurrency.max(1) * 2)
        .tcp_nodelay(true)
        .build()?;
    let url = format!("{}/v1/events", config.url.trim_end_matches('/'));
    let (tx, rx) = mpsc::channel::<Request>(config.concurrency.max(1) * 4);
    let rx = Arc::new(Mutex::new(rx));
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let histogram = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        120_000_000,
        3,
    )?));

    let mut workers = Vec::new();
    for _ in 0..config.concurrency.max(1) {
        let (rx, client, url, tally, histogram) = (
            rx.clone(),
            client.clone(),
            url.clone(),
            tally.clone(),
            histogram.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let Some(req) = rx.lock().await.recv().await else {
                    break;
                };
                let start = req.scheduled.unwrap_or_else(Instant::now);
                let result = client
                    .post(&url)
                    .basic_auth(&req.key, Some(""))
                    .header("content-type", "application/json")
                    .body(req.body)
                    .send()
                    .await;
                let latency = start.elapsed().as_micros() as u64;
                let status = match result {
                    Ok(resp) => {
                        let status = resp.status();
                        // Read the body so the connection goes back to the pool.
                        let _ = resp.bytes().await;
                        Some(status)
                    }
                    Err(_) => None,
                };
                {
                    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                    t.requests += 1;
                    t.sent += req.events;
                    match status {
                        Some(status) => {
                            *t.statuses.entry(status.as_u16()).or_default() += 1;
                            if status.is_success() {
                                t.accepted += req.events;
                            }
                        }
                        None => t.transport_errors += 1,
                    }
                }
                let _ = histogram
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(latency.max(1));
            }
        }));
    }

    let keys: Vec<String> = config
        .stream
        .partners
        .iter()
        .map(|p| p.key.clone())
        .collect();
    let mut batcher = Batcher::new(&config);
    let target = config.events.unwrap_or(u64::MAX);
    let pregenerated: Option<VecDeque<(usize, Vec<u8>, u64)>> = if config.pregenerate {
        let mut all = VecDeque::new();
        let mut n = 0;
        while n < target {
            let r = batcher.next_request();
            n += r.2;
            all.push_back(r);
        }
        Some(all)
    } else {
        None
    };
    let mut pregenerated = pregenerated;
    let started = Instant::now();
    let deadline = config.duration.map(|d| started + d);
    let mut queued = 0u64;
    while queued < target && deadline.is_none_or(|d| Instant::now() < d) {
        let (partner, body, events) = match pregenerated.as_mut() {
            Some(all) => match all.pop_front() {
                Some(r) => r,
                None => break,
            },
            None => batcher.next_request(),
        };
        let scheduled = if config.rate > 0.0 {
            let at = started + Duration::from_secs_f64(queued as f64 / config.rate);
            tokio::time::sleep_until(at.into()).await;
            Some(at)
        } else {
            None
        };
        queued += events;
        let req = Request {
            key: keys[partner].clone(),
            body,
            events,
            scheduled,
        };
        if tx.send(req).await.is_err() {
            break;
        }
    }
    drop(tx);
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed();
    let t = std::mem::take(&mut *tally.lock().unwrap_or_else(|p| p.into_inner()));
    let latency_us = histogram.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(LoadReport {
        events_sent: t.sent,
        events_accepted: t.accepted,
        requests: t.requests,
        statuses: t.statuses,
        transport_errors: t.transport_errors,
        elapsed,
        latency_us,
    })
}

/// Writes `n` generated events as NDJSON (for replaying with other tools, or as ground truth).
pub fn write_ndjson(stream: ClickstreamConfig, n: u64, mut out: impl Write) -> std::io::Result<()> {
    for g in Clickstream::new(stream).take(n as usize) {
        serde_json::to_writer(&mut out, &g.event)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Reads a write-keys file (`{"key": "partner"}`) into partners, in a stable order.
pub fn partners_from_keys_file(path: &std::path::Path) -> anyhow::Result<Vec<Partner>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let map: BTreeMap<String, String> = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} must be {{\"key\": \"partner\"}}: {e}", path.display()))?;
    Ok(map
        .into_iter()
        .map(|(key, id)| Partner { id, key })
        .collect())
}

#[cfg(test)]
mod tests {
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
