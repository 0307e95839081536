//! `pulse-admin`: operators' commands (topics, erasures).

use clap::{Parser, Subcommand};
use pulse_admin::erase::{self, audit, EraseArgs};
use pulse_admin::topics::{self, EnsureArgs, InspectArgs, PeekArgs, RetentionArgs};
use pulse_archive::store::{open_store, StoreArgs};

#[derive(Parser)]
#[command(
    name = "pulse-admin",
    about = "Provision Pulse's Kafka topics; erase people from every store",
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
    /// People: the right to be forgotten.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create `events`, `events.dlq`, `triggers`, `triggers.dlq`, `triggers.state`,
    /// `profiles.dlq`, `identity.unlinks` and `erasures` if missing (the dead-letter topics
    /// take records up to 8 MiB); check existing ones. Idempotent.
    Ensure(EnsureArgs),
    /// Records per partition (high minus low watermark) of a topic, and its retention.
    Describe(InspectArgs),
    /// Print the newest records of a topic (from its fullest partition, or --partition); an
    /// erased person's records are named, not shown.
    Peek(PeekArgs),
    /// Every topic of Pulse: the personal data it holds and how long Kafka keeps it.
    Retention(RetentionArgs),
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Erase a person (and the devices merged into them) from every store: suppressed at
    /// ingest and in every consumer, deleted from every profiles index, the push state, the
    /// archive and the warehouse. Idempotent: run it again to finish a run cut short.
    Erase(Box<EraseArgs>),
    /// The audit log of erasure requests (no personal data).
    Erasures(ErasuresArgs),
}

#[derive(clap::Args)]
struct ErasuresArgs {
    /// Only this partner's requests.
    #[arg(long)]
    partner: Option<String>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pulse_core::telemetry::init_tracing();
    match Cli::parse().command {
        Command::Topics { command } => match command {
            TopicsCommand::Ensure(args) => topics::ensure(args).await,
            TopicsCommand::Describe(args) => topics::describe(&args).await,
            TopicsCommand::Peek(args) => topics::peek(&args),
            TopicsCommand::Retention(args) => topics::retention(&args).await,
        },
        Command::Users { command } => match command {
            UsersCommand::Erase(args) => {
                let report = erase::erase(&args).await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                Ok(())
            }
            UsersCommand::Erasures(args) => erasures(&args).await,
        },
    }
}

async fn erasures(args: &ErasuresArgs) -> anyhow::Result<()> {
    let store = open_store(&args.store)?;
    let records = audit::list(store.as_ref()).await?;
    let records = records
        .into_iter()
        .filter(|r| args.partner.as_ref().is_none_or(|p| &r.partner_id == p));
    if args.json {
        for r in records {
            println!("{}", serde_json::to_string(&r)?);
        }
        return Ok(());
    }
    println!(
        "{:<36}  {:<14} {:<20} {:<10} {:<5} done",
        "request", "partner", "requested (UTC)", "operator", "ids"
    );
    for r in records {
        let done = match r.completed_at {
            Some(at) => format!("complete {}", at.format("%Y-%m-%d %H:%M:%S")),
            None => format!("pending: {}", r.pending().join(", ")),
        };
        println!(
            "{:<36}  {:<14} {:<20} {:<10} {:<5} {done}",
            r.request_id,
            r.partner_id,
            r.requested_at.format("%Y-%m-%d %H:%M:%S"),
            r.operator,
            r.ids.values().sum::<usize>(),
        );
    }
    Ok(())
}
