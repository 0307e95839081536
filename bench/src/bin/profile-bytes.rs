//! What a profile held in the speed layer's memory costs, counted rather than read off the
//! process's RSS (which also holds Kafka's prefetched records and memory the allocator keeps):
//! the bench's clickstream (the same generator, users and seed as `raw-produce`) folded into
//! profiles kept in the speed layer's own cache (`ProfileCache`), with every model on.
//! An allocator that counts live bytes wraps the system's; the figure is the live bytes after
//! the fold over the live bytes before, per profile (the requested sizes: an allocator's own
//! rounding comes on top).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use clap::Parser;
use pulse_bench::StreamArgs;
use pulse_core::{parse_event, ParseContext};
use pulse_speed::dedupe::DedupePolicy;
use pulse_speed::engine::ProfileCache;
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
    let mut profiles = ProfileCache::default();
    // The ids, for the breakdown at the end (outside the bytes counted).
    let mut ids = Vec::new();
    let now = Instant::now();
    let before = LIVE.load(Ordering::Relaxed);
    for (offset, generated) in stream.take(a.events as usize).enumerate() {
        let event = parse_event(&generated.event.to_string(), &ctx)
            .map_err(|e| anyhow::anyhow!("generated event refused: {e}"))?;
        let at = Watermark {
            partition: 0,
            offset: offset as i64,
        };
        let id = event.partition_key();
        if !profiles.contains(&id) {
            ids.push(id.clone());
        }
        profiles.fold(
            &id,
            0,
            now,
            || Profile::new(&event, &kinds),
            |profile| profile.fold(&event, at, &policy),
        );
    }
    // Less the ids' list, which is the bench's, not the cache's.
    let listed = ids.capacity() * std::mem::size_of::<String>()
        + ids.iter().map(String::capacity).sum::<usize>();
    let held = LIVE.load(Ordering::Relaxed) - before - listed as i64;
    let (count, n) = (profiles.len(), profiles.len().max(1));
    let parts = breakdown(&mut profiles, &ids);
    println!(
        "{}",
        serde_json::json!({
            "events": a.events, "profiles": count, "live_bytes": held,
            "bytes_per_profile": held as f64 / n as f64,
            "parts_per_profile": parts.iter().map(|(k, b)| (k.to_string(), serde_json::json!(*b as f64 / n as f64))).collect::<serde_json::Map<_, _>>(),
        })
    );
    eprintln!(
        "{} profiles from {} events: {:.1} MiB live, {:.0} bytes per profile (target <= 1,024)",
        count,
        a.events,
        held as f64 / 1048576.0,
        held as f64 / n as f64
    );
    Ok(())
}

/// Where the bytes are: each part of every profile dropped in turn, the live bytes it freed
/// counted (what remains at the end is the cache with the profiles' own structs and ids).
fn breakdown(profiles: &mut ProfileCache, ids: &[String]) -> Vec<(&'static str, i64)> {
    let mut parts = Vec::new();
    let mut part = |name: &'static str, drop_part: &mut dyn FnMut(&mut Profile)| {
        let live = LIVE.load(Ordering::Relaxed);
        for id in ids {
            if let Some(profile) = profiles.get_mut(id) {
                drop_part(profile);
            }
        }
        parts.push((name, live - LIVE.load(Ordering::Relaxed)));
    };
    part("dedupe", &mut |p| p.recent = Default::default());
    part("category", &mut |p| p.category = Vec::new());
    part("event_counts", &mut |p| p.event_counts = Default::default());
    part("models", &mut |p| p.models = Default::default());
    part("identity", &mut |p| p.identity = None);
    part("strings", &mut |p| {
        p.session_id = None;
        p.client = None;
    });
    let live = LIVE.load(Ordering::Relaxed);
    profiles.forget(&[0]);
    parts.push(("cache_and_structs", live - LIVE.load(Ordering::Relaxed)));
    parts
}
