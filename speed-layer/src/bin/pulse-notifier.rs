//! `pulse-notifier`: delivers fired triggers to the partner's push webhook.

use clap::Parser;
use pulse_service::{ops, Readiness, Shutdown};
use pulse_speed::notifier::{Notifier, NotifierConfig};

#[derive(Parser)]
#[command(name = "pulse-notifier", about = "Deliver Pulse triggers to a push webhook", version)]
struct Cli {
    #[command(flatten)]
    config: NotifierConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pulse_core::telemetry::init_tracing();
    pulse_core::telemetry::exit_on_panic();
    let config = Cli::parse().config;
    let shutdown = Shutdown::on_signals();
    let handle = ops::recorder(&[]);
    let listen = config.metrics_listen;
    // Not ready while Kafka refuses what a trigger waits for (see `KafkaCalls`).
    let ready = Readiness::new("notifier not ready");
    let (endpoint, endpoint_ready) = (shutdown.clone(), ready.clone());
    tokio::spawn(async move {
        if let Err(e) = ops::serve(listen, handle, endpoint_ready, endpoint).await {
            tracing::error!(error = %e, %listen, "metrics endpoint failed");
        }
    });
    Notifier::new(config)?.run(shutdown, &ready).await?;
    Ok(())
}
