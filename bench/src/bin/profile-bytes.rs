//! What a profile held in the speed layer's memory costs, counted rather than read off the
//! process's RSS (which also holds Kafka's prefetched records and memory the allocator keeps):
//! the bench's clickstream (the same generator, users and seed as `raw-produce`) folded into
//! profiles kept in a map by id, as the speed layer's cache keeps them, with every model on.
//! An allocator that counts live bytes wraps the system's; the figure is the live bytes after
//! the fold over the live bytes before, per profile (the requested sizes: an allocator's own
//! rounding comes on top).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};

use clap::Parser;
use pulse_bench::StreamArgs;
use pulse_core::{parse_event, ParseContext};
use pulse_speed::dedupe::DedupePolicy;
use pulse_speed::models;
use pulse_speed::profile::{Profile, Watermark};

/// Bytes allocated and not yet freed.
static LIVE: AtomicI64 = AtomicI64::new(0);

struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 2_000_000)]
    events: u64,
    #[command(flatten)]
    stream: StreamArgs,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let stream = a.stream.stream()?;
    let kinds = models::registry();
    let policy = DedupePolicy::default();
    let ctx = ParseContext::now();
    let mut profiles: HashMap<String, Profile> = HashMap::new();
    let before = LIVE.load(Ordering::Relaxed);
    for (offset, generated) in stream.take(a.events as usize).enumerate() {
        let event = parse_event(&generated.event.to_string(), &ctx)
            .map_err(|e| anyhow::anyhow!("generated event refused: {e}"))?;
        let profile = profiles
            .entry(event.partition_key())
            .or_insert_with(|| Profile::new(&event, &kinds));
        let at = Watermark {
            partition: 0,
            offset: offset as i64,
        };
        profile.fold(&event, at, &policy);
    }
    let held = LIVE.load(Ordering::Relaxed) - before;
    let n = profiles.len().max(1);
    println!(
        "{}",
        serde_json::json!({
            "events": a.events, "profiles": profiles.len(), "live_bytes": held,
            "bytes_per_profile": held as f64 / n as f64,
        })
    );
    eprintln!(
        "{} profiles from {} events: {:.1} MiB live, {:.0} bytes per profile (target <= 1,024)",
        profiles.len(),
        a.events,
        held as f64 / 1048576.0,
        held as f64 / n as f64
    );
    Ok(())
}
