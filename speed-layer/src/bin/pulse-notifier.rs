//! `pulse-notifier`: delivers fired triggers to the partner's push webhook.

use clap::Parser;
use pulse_speed::notifier::{Notifier, NotifierConfig};

#[derive(Parser)]
#[command(
    name = "pulse-notifier",
    about = "Deliver Pulse triggers to a push webhook",
    version
)]
struct Cli {
    #[command(flatten)]
    config: NotifierConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pulse_core::telemetry::init_tracing();
    pulse_core::telemetry::exit_on_panic();
    let config = Cli::parse().config;
    let handle = pulse_speed::metrics::install();
    let listen = config.metrics_listen;
    // The notifier has no dependency to watch beyond Kafka, which its client retries.
    let ready = pulse_speed::metrics::Readiness::new("notifier not ready");
    tokio::spawn(async move {
        if let Err(e) = pulse_speed::metrics::serve(listen, handle, ready).await {
            tracing::error!(error = %e, %listen, "metrics endpoint failed");
        }
    });
    Notifier::new(config)?
        .run(pulse_ingest::server::shutdown_signal())
        .await?;
    Ok(())
}
