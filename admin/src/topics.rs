//! `pulse-admin topics`: provisioning and inspecting Pulse's Kafka topics.

use std::collections::BTreeMap;
use std::time::Duration;

use pulse_core::kafka::{
    ensure_topics, topic_configs, KafkaArgs, TopicArgs, TopicOutcome, TopicSpec,
};
use pulse_service::erasures::ErasureFeed;
use pulse_service::outbox::DEAD_LETTER_MAX_BYTES;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

#[derive(clap::Args)]
pub struct InspectArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Topic to inspect.
    #[arg(default_value = "events")]
    topic: String,
}

#[derive(clap::Args)]
pub struct PeekArgs {
    #[command(flatten)]
    inspect: InspectArgs,
    /// How many records.
    #[arg(long, default_value_t = 1)]
    count: i64,
    /// The partition to read (default: the fullest).
    #[arg(long)]
    partition: Option<i32>,
    /// The erased people's ids, whose records are not shown.
    #[arg(long = "erasures-topic", env = "PULSE_ERASURES_TOPIC", default_value = "erasures")]
    erasures_topic: String,
}

#[derive(clap::Args)]
pub struct EnsureArgs {
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

pub async fn describe(args: &InspectArgs) -> anyhow::Result<()> {
    let marks = watermarks(args)?;
    let configs = topic_configs(&args.kafka, &args.topic, Duration::from_secs(10)).await?;
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
    println!("  {}", retention_line(&configs));
    Ok(())
}

/// Prints the newest records of one partition. A record keyed by an erased person's profile
/// id (every topic of Pulse keys a person's records by it) is named but not shown: it stays
/// in Kafka until retention, and an operator's look is a reader too.
pub fn peek(args: &PeekArgs) -> anyhow::Result<()> {
    let erasures = ErasureFeed::follow_loaded(
        args.inspect.kafka.consumer_config("pulse-admin-erasures"),
        &args.erasures_topic,
    )?;
    let marks = watermarks(&args.inspect)?;
    let chosen = match args.partition {
        Some(p) => marks.iter().find(|(partition, _, _)| *partition == p),
        None => marks.iter().max_by_key(|(_, low, high)| high - low),
    };
    let Some(&(partition, low, high)) = chosen else {
        anyhow::bail!("topic {} has no such partition", args.inspect.topic);
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
                if erasures.read().contains_profile(&key) {
                    println!(
                        "partition {} offset {} key (erased)\nan erased person's record: not shown (it goes with the topic's retention)",
                        m.partition(),
                        m.offset()
                    );
                    continue;
                }
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

pub async fn ensure(args: EnsureArgs) -> anyhow::Result<()> {
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
        // Erased people's ids: read whole, then followed, by every service; kept for good.
        TopicSpec::compacted(&args.topics.erasures, 1, replication),
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

/// "kept 7 days (cleanup.policy delete)", from a topic's configuration.
fn retention_line(configs: &BTreeMap<String, String>) -> String {
    let policy = configs
        .get("cleanup.policy")
        .map_or("delete", String::as_str);
    let retention = configs
        .get("retention.ms")
        .and_then(|v| v.parse::<i64>().ok())
        .map_or("broker default".to_string(), human_ms);
    match policy.contains("compact") {
        true => format!(
            "compacted: the newest record per key is kept for good (cleanup.policy {policy})"
        ),
        false => format!("records kept {retention} (retention.ms; cleanup.policy {policy})"),
    }
}

fn human_ms(ms: i64) -> String {
    match ms {
        -1 => "for good".into(),
        ms if ms % 86_400_000 == 0 => format!("{} days", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 => format!("{} hours", ms / 3_600_000),
        ms => format!("{} s", ms / 1000),
    }
}

/// Each topic of Pulse: what personal data it holds, and how long Kafka keeps it. Records
/// cannot be deleted one by one from Kafka: they go with retention (or, compacted, with a
/// tombstone of their key), so this is how long an erased person's records stay in Kafka,
/// passed over by every reader meanwhile.
pub async fn retention(args: &RetentionArgs) -> anyhow::Result<()> {
    let t = &args.topics;
    let topics = [
        (
            t.events.clone(),
            "every event: ids, pages, products, amounts",
        ),
        (t.dlq.clone(), "events no consumer could use, whole"),
        (t.triggers.clone(), "fired triggers: user id and the event"),
        (
            format!("{}.dlq", t.triggers),
            "triggers not delivered, whole",
        ),
        (
            format!("{}.state", t.triggers),
            "pushes per user (keyed by user id)",
        ),
        (
            t.profiles_dlq.clone(),
            "profile documents Elasticsearch refused, whole",
        ),
        (
            t.unlinks.clone(),
            "unlinked devices: user and anonymous ids",
        ),
        (
            t.erasures.clone(),
            "erased ids: kept for good, so that they stay suppressed",
        ),
    ];
    for (name, holds) in topics {
        let line = match topic_configs(&args.kafka, &name, Duration::from_secs(10)).await {
            Ok(configs) if !configs.is_empty() => retention_line(&configs),
            Ok(_) | Err(_) => "does not exist".to_string(),
        };
        println!("{name:<24} {holds}\n{:<24} {line}", "");
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct RetentionArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topics: TopicArgs,
}
