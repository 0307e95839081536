//! `pulse-batch`: daily BigQuery loads, BI SQL (embedded engine or BigQuery), archive listing.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use pulse_batch::sql::{self, OutputFormat};
use pulse_batch::store::{open_store, StoreArgs};
use pulse_batch::warehouse::load::{last_days, load_day, source_prefix, MAX_URIS_PER_JOB};
use pulse_batch::warehouse::{Warehouse, WarehouseArgs};
use pulse_core::kafka::KafkaArgs;
use pulse_service::erasures::{ErasureFeed, LOAD_PATIENCE};

#[derive(Parser)]
#[command(
    name = "pulse-batch",
    about = "Pulse batch layer: BigQuery loads and BI SQL over the Parquet archive",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run SQL on the embedded engine over the archive's committed files (tables `events`
    /// and `identities`).
    Sql {
        /// The query (or use --file).
        query: Option<String>,
        /// A report file, e.g. warehouse-sql/reports/funnel.sql.
        #[arg(long)]
        file: Option<PathBuf>,
        /// A `{{name}}` parameter of the query, as name=value (repeatable).
        #[arg(long = "param", value_parser = pulse_core::kafka::parse_key_value)]
        params: Vec<(String, String)>,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
        /// Where to run it: DataFusion over the archive, or the BigQuery table.
        #[arg(long, value_enum, default_value_t = Engine::Embedded)]
        engine: Engine,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        warehouse: WarehouseArgs,
    },
    /// Load days of the archive into the BigQuery tables (`events`, `identities`), replacing
    /// their partitions.
    Load {
        /// The day to load, YYYY-MM-DD (UTC, as the archive's dt=).
        #[arg(long, conflicts_with = "since", required_unless_present = "since")]
        date: Option<chrono::NaiveDate>,
        /// Load the last N days, today (UTC) included.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        since: Option<u32>,
        /// gs://bucket/prefix BigQuery reads the archive from; defaults to --archive-url when
        /// that is on Cloud Storage.
        #[arg(long, env = "PULSE_BQ_SOURCE_URI")]
        source_uri: Option<String>,
        /// Print each day's report as a JSON line.
        #[arg(long)]
        json: bool,
        /// Most files per staging load job (BigQuery's limit, 10,000); tests set it low to
        /// load a small day in several jobs, as a day of 100 partitions is loaded.
        #[arg(long, env = "PULSE_BQ_MAX_FILES_PER_JOB", default_value_t = MAX_URIS_PER_JOB as u64, hide = true,
              value_parser = clap::value_parser!(u64).range(1..=MAX_URIS_PER_JOB as u64))]
        max_files_per_job: u64,
        /// Where Kafka is: the load reads the erasures topic, and leaves erased people's rows
        /// out of what it loads.
        #[command(flatten)]
        kafka: KafkaArgs,
        /// The compacted topic of erased people (see `pulse-admin users erase`).
        #[arg(long = "erasures-topic", env = "PULSE_ERASURES_TOPIC", default_value = "erasures")]
        erasures_topic: String,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        warehouse: WarehouseArgs,
    },
    /// List the committed Parquet files (optionally of one day).
    Files {
        /// Day, YYYY-MM-DD.
        #[arg(long)]
        date: Option<chrono::NaiveDate>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Engine {
    Embedded,
    Bigquery,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pulse_core::telemetry::init_tracing();
    pulse_core::telemetry::exit_on_panic();
    match Cli::parse().command {
        Command::Sql {
            query,
            file,
            params,
            format,
            engine,
            store,
            warehouse,
        } => {
            let text = match (query, file) {
                (Some(q), None) => q,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))?,
                _ => anyhow::bail!("give a query or --file, not both"),
            };
            let params: BTreeMap<String, String> = params.into_iter().collect();
            let text = sql::substitute(&text, &params)?;
            let batches = match engine {
                Engine::Embedded => sql::query(open_store(&store)?, &text).await?,
                Engine::Bigquery => Warehouse::connect(&warehouse).await?.query(&text).await?,
            };
            print!("{}", sql::render(&batches, format)?);
            if format == OutputFormat::Table {
                println!();
            }
        }
        Command::Load {
            date,
            since,
            source_uri,
            json,
            max_files_per_job,
            kafka,
            erasures_topic,
            store,
            warehouse,
        } => {
            let feed = ErasureFeed::follow(
                kafka.consumer_config("pulse-batch-erasures"),
                &erasures_topic,
            );
            feed.loaded(LOAD_PATIENCE).await?;
            let prefix = source_prefix(source_uri.as_deref(), &store.url)?;
            let days = match (date, since) {
                (Some(d), _) => vec![d],
                (None, Some(n)) => last_days(chrono::Utc::now().date_naive(), n),
                (None, None) => anyhow::bail!("give --date or --since"),
            };
            let archive = open_store(&store)?;
            let wh = Warehouse::connect(&warehouse).await?;
            wh.ensure_table().await?;
            for day in days {
                // As of this day's load: an erasure recorded meanwhile counts.
                let erased = feed.read().clone();
                let report = load_day(
                    &wh,
                    archive.as_ref(),
                    &prefix,
                    day,
                    max_files_per_job as usize,
                    &erased,
                )
                .await?;
                if json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    println!(
                        "{}  {} rows ({} archived, {} client retries dropped) from {} files into {}.{}.{}; {} merged devices from {} identity files into {}  (jobs {})",
                        report.date,
                        report.rows,
                        report.archived_rows,
                        report.duplicates,
                        report.files,
                        wh.project,
                        wh.dataset,
                        wh.table,
                        report.identities,
                        report.identity_files,
                        wh.identities,
                        report.jobs.join(", ")
                    );
                }
            }
        }
        Command::Files { date, store } => {
            let store = open_store(&store)?;
            for file in pulse_batch::layout::committed_files(store.as_ref(), date).await? {
                let range = file.range;
                println!(
                    "{}  (partition {}, offsets {}..={})",
                    file.path, range.partition, range.first, range.last
                );
            }
        }
    }
    Ok(())
}
