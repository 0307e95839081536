//! `pulse-loadgen`: realistic clickstream against ingest, with achieved rate and latency.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use pulse_loadgen::{self as loadgen, ClickstreamConfig, LoadConfig};

#[derive(Parser)]
#[command(name = "pulse-loadgen", about = "Send realistic clickstream to Pulse ingest", version)]
struct Args {
    /// Ingest base URL.
    #[arg(long, env = "PULSE_INGEST_URL", default_value = "http://localhost:8080")]
    url: String,
    /// Write keys file (`{"key": "partner"}`); one partner per key.
    #[arg(long, env = "PULSE_WRITE_KEYS_FILE", default_value = "deploy/local/write-keys.json")]
    keys_file: PathBuf,
    /// Number of events to send.
    #[arg(long)]
    events: Option<u64>,
    /// Or: how long to send, in seconds.
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Events per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Events per request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Distinct users per partner (Zipf-distributed).
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    #[arg(long, default_value_t = 1.1)]
    zipf_exponent: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Share of users (0 to 1) who browse anonymously on a device and log in on it in about
    /// half their sessions (the speed layer then merges the device into them).
    #[arg(long, default_value_t = 0.0)]
    login_share: f64,
    /// Build every request before starting the clock (needs --events).
    #[arg(long)]
    pregenerate: bool,
    /// Print the generated events as NDJSON to stdout instead of sending them.
    #[arg(long)]
    print: bool,
    /// Print the report as one JSON object (for scripts).
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let stream = ClickstreamConfig {
        partners: loadgen::partners_from_keys_file(&a.keys_file)?,
        users: a.users,
        zipf_exponent: a.zipf_exponent,
        concurrent_sessions: 256,
        seed: a.seed,
        login_share: a.login_share,
    };
    if a.print {
        let n = a.events.unwrap_or(10);
        loadgen::write_ndjson(stream, n, std::io::stdout().lock())?;
        return Ok(());
    }
    anyhow::ensure!(
        !a.pregenerate || a.events.is_some(),
        "--pregenerate needs --events"
    );
    let report = loadgen::run(LoadConfig {
        url: a.url,
        stream,
        events: a.events,
        duration: a.duration_secs.map(Duration::from_secs_f64),
        rate: a.rate,
        batch: a.batch,
        concurrency: a.concurrency,
        pregenerate: a.pregenerate,
    })
    .await?;
    if a.json {
        let q = |p: f64| report.latency_us.value_at_quantile(p) as f64 / 1000.0;
        println!(
            "{}",
            serde_json::json!({
                "events_sent": report.events_sent,
                "events_accepted": report.events_accepted,
                "requests": report.requests,
                "statuses": report.statuses,
                "transport_errors": report.transport_errors,
                "elapsed_secs": report.elapsed.as_secs_f64(),
                "events_per_sec": report.events_per_sec(),
                "latency_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": report.latency_us.max() as f64 / 1000.0},
            })
        );
    } else {
        println!("{}", report.summary());
    }
    anyhow::ensure!(
        report.events_accepted == report.events_sent,
        "{} events were not accepted",
        report.events_sent - report.events_accepted
    );
    Ok(())
}
