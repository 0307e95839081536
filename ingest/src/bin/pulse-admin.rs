//! `pulse-admin`: provisioning commands for operators.

use std::time::Duration;

use clap::{Parser, Subcommand};
use pulse_core::kafka::{ensure_topics, KafkaArgs, TopicArgs, TopicOutcome, TopicSpec};
use pulse_service::outbox::DEAD_LETTER_MAX_BYTES;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

#[derive(Parser)]
#[command(name = "pulse-admin", about = "Provision Pulse's Kafka topics", version)]
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
    /// Create `events`, `events.dlq`, `triggers`, `triggers.dlq`, `triggers.state`,
    /// `profiles.dlq` and `identity.unlinks` if missing (the dead-letter topics take records up to 8 MiB); check
    /// existing ones. Idempotent.
    Ensure(EnsureArgs),
    /// Records per partition (high minus low watermark) of a topic.
    Describe(InspectArgs),
    /// Print the newest records of a topic (from its fullest partition).
    Peek(PeekArgs),
}

#[derive(clap::Args)]
struct InspectArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Topic to inspect.
    #[arg(default_value = "events")]
    topic: String,
}

#[derive(clap::Args)]
struct PeekArgs {
    #[command(flatten)]
    inspect: InspectArgs,
    /// How many records.
    #[arg(long, default_value_t = 1)]
    count: i64,
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
        command: Command::Topics { command },
    } = Cli::parse();
    match command {
        TopicsCommand::Ensure(args) => ensure(args).await,
        TopicsCommand::Describe(args) => describe(&args),
        TopicsCommand::Peek(args) => peek(&args),
    }
}

/// Low and high watermark of every partition, in partition order.
fn watermarks(args: &InspectArgs) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let consumer: BaseConsumer = args.kafka.client_config().create()?;
    let md = consumer.fetch_metadata(Some(&args.topic), Duration::from_secs(10))?;
    let topic = md
        .topics()
        .iter()
        .find(|t| t.name() == args.topic && t.error().is_none())
        .ok_or_else(|| anyhow::anyhow!("topic {} does not exist", args.topic))?;
    let mut out = Vec::new();
    for p in topic.partitions() {
        let (low, high) = fetch_watermarks(&consumer, &args.topic, p.id())?;
        out.push((p.id(), low, high));
    }
    out.sort();
    Ok(out)
}

/// A partition's watermarks. Right after a topic is created the broker can still answer
/// "not leader" for a few seconds while leadership settles; that is waited out, up to 15 s.
fn fetch_watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
) -> anyhow::Result<(i64, i64)> {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::NotLeaderForPartition | RDKafkaErrorCode::LeaderNotAvailable,
            )) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            other => return Ok(other?),
        }
    }
}

fn describe(args: &InspectArgs) -> anyhow::Result<()> {
    let marks = watermarks(args)?;
    let counts: Vec<i64> = marks.iter().map(|(_, low, high)| high - low).collect();
    let total: i64 = counts.iter().sum();
    println!(
        "topic {}: {} partitions, {total} records",
        args.topic,
        marks.len()
    );
    for chunk in marks.chunks(10) {
        let line: Vec<String> = chunk
            .iter()
            .map(|(p, low, high)| format!("p{p:<3}{:>7}", high - low))
            .collect();
        println!("  {}", line.join(" "));
    }
    if let (Some(min), Some(max)) = (counts.iter().min(), counts.iter().max()) {
        println!(
            "  min {min}, max {max}, mean {:.1}",
            total as f64 / counts.len().max(1) as f64
        );
    }
    Ok(())
}

fn peek(args: &PeekArgs) -> anyhow::Result<()> {
    let marks = watermarks(&args.inspect)?;
    let Some(&(partition, low, high)) = marks.iter().max_by_key(|(_, low, high)| high - low) else {
        anyhow::bail!("topic has no partitions");
    };
    anyhow::ensure!(high > low, "topic {} is empty", args.inspect.topic);
    let start = (high - args.count.max(1)).max(low);
    let consumer: BaseConsumer = args
        .inspect
        .kafka
        .consumer_config("pulse-admin-peek")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&args.inspect.topic, partition, Offset::Offset(start))?;
    consumer.assign(&tpl)?;
    let mut seen = 0;
    while seen < high - start {
        match consumer.poll(Duration::from_secs(10)) {
            Some(Ok(m)) => {
                seen += 1;
                let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
                let payload = m.payload().unwrap_or_default();
                let pretty = serde_json::from_slice::<serde_json::Value>(payload)
                    .and_then(|v| serde_json::to_string_pretty(&v))
                    .unwrap_or_else(|_| String::from_utf8_lossy(payload).into_owned());
                println!(
                    "partition {} offset {} key {key}\n{pretty}",
                    m.partition(),
                    m.offset()
                );
            }
            Some(Err(e)) => anyhow::bail!("reading {}: {e}", args.inspect.topic),
            None => anyhow::bail!("timed out reading {}", args.inspect.topic),
        }
    }
    Ok(())
}

async fn ensure(args: EnsureArgs) -> anyhow::Result<()> {
    let (aux, replication) = (args.aux_partitions, args.replication);
    let dead_letters = |name: &str| {
        TopicSpec::new(name, aux, replication).with_max_message_bytes(DEAD_LETTER_MAX_BYTES)
    };
    let specs = [
        TopicSpec::new(&args.topics.events, args.partitions, replication),
        dead_letters(&args.topics.dlq),
        TopicSpec::new(&args.topics.triggers, aux, replication),
        dead_letters(&format!("{}.dlq", args.topics.triggers)),
        // The notifier's pushes per user, partitioned as the triggers are.
        TopicSpec::compacted(format!("{}.state", args.topics.triggers), aux, replication),
        dead_letters(&args.topics.profiles_dlq),
        // Devices unlinked from their person: a handful of records, read whole at start.
        TopicSpec::compacted(&args.topics.unlinks, 1, replication),
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
            TopicOutcome::Undersized {
                name,
                partitions,
                max_message_bytes,
                want,
            } => println!(
                "warn    {name} ({partitions} partitions) takes records up to \
                 {max_message_bytes} bytes, below the {want} a dead-letter topic needs: a dead \
                 letter larger than that holds its consumer until the topic is raised \
                 (kafka-configs --alter --entity-type topics --entity-name {name} \
                 --add-config max.message.bytes={want})"
            ),
        }
    }
    Ok(())
}
