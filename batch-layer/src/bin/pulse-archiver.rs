//! `pulse-archiver`: archives the `events` topic as Parquet, exactly once.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use pulse_batch::archiver::{run, ArchiverConfig};
use pulse_ingest::ops::Readiness;

#[derive(Parser)]
#[command(
    name = "pulse-archiver",
    about = "Archive Pulse events as Parquet in object storage",
    version
)]
struct Cli {
    #[command(flatten)]
    config: ArchiverConfig,
}

fn main() -> anyhow::Result<()> {
    pulse_core::telemetry::init_tracing();
    pulse_core::telemetry::exit_on_panic();
    let config = Cli::parse().config;
    let stop = Arc::new(AtomicBool::new(false));
    // Not ready while the object store fails, or when the loop stops turning.
    let ready = Readiness::with_heartbeat("object store unavailable", Readiness::STALL_AFTER);
    let signal_stop = stop.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = pulse_ingest::ops::install_recorder();
    let (listen, endpoint_ready) = (config.metrics_listen, ready.clone());
    rt.spawn(async move {
        if let Err(e) = pulse_ingest::ops::serve(listen, handle, endpoint_ready).await {
            tracing::error!(error = %e, %listen, "metrics endpoint failed");
        }
    });
    // The consumer loop is blocking; signals and the endpoint get a thread of their own.
    std::thread::spawn(move || {
        rt.block_on(pulse_ingest::server::shutdown_signal());
        signal_stop.store(true, Ordering::Relaxed);
    });
    let summary = run(&config, stop, ready)?;
    tracing::info!(?summary, "archiver stopped");
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
