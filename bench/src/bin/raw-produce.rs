//! Baseline for `bench/ingest`: the same events, pre-serialised in the canonical form, produced
//! straight to Kafka with librdkafka and the same producer settings as ingest (acks=all,
//! idempotence, lz4, linger 5 ms). The clock runs from the first send to the last
//! acknowledgement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use pulse_bench::StreamArgs;
use pulse_core::kafka::KafkaArgs;
use pulse_core::{parse_event, ParseContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[arg(long, default_value = "bench.events")]
    topic: String,
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    #[command(flatten)]
    stream: StreamArgs,
    /// Share of events sent a second time after all the others, as a client's retry would
    /// be (same message id and payload): what the warehouse's dedupe has to find.
    #[arg(long, default_value_t = 0.0)]
    retry_share: f64,
}

struct Acks {
    ok: AtomicU64,
    failed: AtomicU64,
}

struct Counting(Arc<Acks>);

impl ClientContext for Counting {}
impl ProducerContext for Counting {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.0.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let stream = a.stream.stream()?;
    let ctx = ParseContext::now();
    let mut records: Vec<(String, Vec<u8>)> = stream
        .take(a.events as usize)
        .map(|g| {
            let e = parse_event(&g.event.to_string(), &ctx).expect("generated events are valid");
            (e.partition_key(), e.to_canonical_json())
        })
        .collect();
    // Every n-th event again, at the end: deterministic, spread over partners and users.
    if a.retry_share > 0.0 {
        let every = (1.0 / a.retry_share).round().max(1.0) as usize;
        let copies: Vec<_> = records.iter().step_by(every).cloned().collect();
        records.extend(copies);
    }
    let json_bytes: usize = records.iter().map(|(_, p)| p.len()).sum();

    let acks = Arc::new(Acks {
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let producer: ThreadedProducer<Counting> = a
        .kafka
        .producer_config()
        .create_with_context(Counting(acks.clone()))?;
    let started = Instant::now();
    for (key, payload) in &records {
        let mut record = BaseRecord::to(&a.topic).key(key).payload(payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => anyhow::bail!("produce failed: {e}"),
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let elapsed = started.elapsed();
    let ok = acks.ok.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "events": records.len(),
            "acked": ok,
            "failed": acks.failed.load(Ordering::Relaxed),
            "elapsed_secs": elapsed.as_secs_f64(),
            "events_per_sec": ok as f64 / elapsed.as_secs_f64(),
            "mean_event_bytes": json_bytes / records.len().max(1),
        })
    );
    Ok(())
}
