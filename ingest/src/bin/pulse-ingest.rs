//! `pulse-ingest`: the HTTP ingest service.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use pulse_ingest::{serve, IngestConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pulse_core::telemetry::init_tracing();
    pulse_core::telemetry::exit_on_panic();
    let config = IngestConfig::parse();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let shutdown = pulse_service::Shutdown::on_signals();
    serve(config, listener, async move { shutdown.stopped().await }).await?;
    Ok(())
}
