//! `pulse-admin`: provisioning commands for operators.

use std::time::Duration;

use clap::{Parser, Subcommand};
use pulse_core::kafka::{ensure_topics, KafkaArgs, TopicArgs, TopicOutcome, TopicSpec};

#[derive(Parser)]
#[command(
    name = "pulse-admin",
    about = "Provision Pulse's Kafka topics",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Kafka topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create `events`, `events.dlq` and `triggers` if missing; check existing ones. Idempotent.
    Ensure(EnsureArgs),
}

#[derive(clap::Args)]
struct EnsureArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    topics: TopicArgs,
    /// Partitions of the events topic. Fixed for the life of the topic: a user's partition
    /// depends on it.
    #[arg(long, env = "PULSE_EVENTS_PARTITIONS", default_value_t = 100)]
    partitions: i32,
    /// Partitions of the dead-letter and triggers topics.
    #[arg(long, env = "PULSE_AUX_PARTITIONS", default_value_t = 10)]
    aux_partitions: i32,
    /// Replication factor (3 in production, 1 on a single local broker).
    #[arg(long, env = "PULSE_REPLICATION_FACTOR", default_value_t = 1)]
    replication: i32,
    /// Seconds to wait for the broker.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pulse_core::telemetry::init_tracing();
    let Cli {
        command: Command::Topics {
            command: TopicsCommand::Ensure(args),
        },
    } = Cli::parse();
    let specs = [
        TopicSpec {
            name: args.topics.events.clone(),
            partitions: args.partitions,
            replication: args.replication,
        },
        TopicSpec {
            name: args.topics.dlq.clone(),
            partitions: args.aux_partitions,
            replication: args.replication,
        },
        TopicSpec {
            name: args.topics.triggers.clone(),
            partitions: args.aux_partitions,
            replication: args.replication,
        },
    ];
    let outcomes =
        ensure_topics(&args.kafka, &specs, Duration::from_secs(args.timeout_secs)).await?;
    for o in outcomes {
        match o {
            TopicOutcome::Created { name, partitions } => {
                println!("created {name} ({partitions} partitions)")
            }
            TopicOutcome::Exists { name, partitions } => {
                println!("ok      {name} ({partitions} partitions)")
            }
        }
    }
    Ok(())
}
