//! Deletes the topics a bench run made: `--topic` and every topic under it (`<topic>.dlq`,
//! `<topic>.triggers`, …). The name must start with `bench.`, so that no other topic can be
//! named by mistake. Each bench calls it on exit: its pre-filled topics hold a gigabyte each,
//! and runs that left them behind filled the local broker's disk and slowed its restart
//! (12 GB of them once).

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use pulse_core::kafka::KafkaArgs;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// The run's topic (`bench.<name>.<pid>`); the topics named `<topic>.…` go with it.
    #[arg(long)]
    topic: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if !a.topic.starts_with("bench.") || a.topic.len() <= "bench.".len() {
        bail!(
            "--topic must name a bench's topic (bench.<name>.<pid>), got {:?}",
            a.topic
        );
    }
    let under = format!("{}.", a.topic);
    let config = a.kafka.client_config();
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .context("listing the broker's topics")?;
    let names: Vec<&str> = metadata
        .topics()
        .iter()
        .map(|t| t.name())
        .filter(|n| *n == a.topic || n.starts_with(&under))
        .collect();
    if names.is_empty() {
        println!("no topic {} or under it", a.topic);
        return Ok(());
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.delete_topics(&names, &options).await?;
    let mut failed = 0;
    for result in results {
        match result {
            Ok(name) => println!("deleted {name}"),
            Err((name, code)) => {
                failed += 1;
                eprintln!("{name}: {code}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of the topics were not deleted");
    }
    Ok(())
}
