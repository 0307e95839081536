//! The load runner: posts a clickstream to ingest over HTTP at a rate, with a number of
//! requests in flight, and reports what it achieved (statuses, rate, latency histogram).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::sync::{mpsc, Mutex};

use crate::clickstream::{Clickstream, ClickstreamConfig};

/// Why a load run could not start (failed requests are counted, not errors).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("no partners/write keys given")]
    NoPartners,
    #[error("give a number of events or a duration")]
    Unbounded,
    #[error("building the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("latency histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
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
pub async fn run(config: LoadConfig) -> Result<LoadReport, LoadError> {
    if config.stream.partners.is_empty() {
        return Err(LoadError::NoPartners);
    }
    if config.events.is_none() && config.duration.is_none() {
        return Err(LoadError::Unbounded);
    }
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
