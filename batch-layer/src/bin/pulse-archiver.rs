//! `pulse-archiver`: archives the `events` topic as Parquet, exactly once.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use pulse_batch::archiver::{run, ArchiverConfig};
use pulse_service::{ops, Readiness, Shutdown};

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
    // Not ready while the object store fails, or when the loop stops turning.
    let ready = Readiness::with_heartbeat("object store unavailable", Readiness::STALL_AFTER);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stop = Shutdown::on_signals();
    let handle = ops::recorder(&[]);
    let (listen, endpoint_ready, endpoint_stop) =
        (config.metrics_listen, ready.clone(), stop.clone());
    // The consumer loop is blocking; signals and the endpoint get a thread of their own.
    std::thread::spawn(move || {
        rt.block_on(async move {
            if let Err(e) = ops::serve(listen, handle, endpoint_ready, endpoint_stop).await {
                tracing::error!(error = %e, %listen, "metrics endpoint failed");
            }
        })
    });
    let summary = run(&config, stop, ready)?;
    tracing::info!(?summary, "archiver stopped");
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
