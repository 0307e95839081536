//! `pulse-batch`: BI SQL over the archive, and archive inspection.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use pulse_batch::sql::{self, OutputFormat};
use pulse_batch::store::{open_store, StoreArgs};

#[derive(Parser)]
#[command(
    name = "pulse-batch",
    about = "Pulse batch layer: SQL over the Parquet archive",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run SQL on the embedded engine over the archive's committed files (table `events`).
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
        #[command(flatten)]
        store: StoreArgs,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Sql {
            query,
            file,
            params,
            format,
            store,
        } => {
            let text = match (query, file) {
                (Some(q), None) => q,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))?,
                _ => anyhow::bail!("give a query or --file, not both"),
            };
            let params: BTreeMap<String, String> = params.into_iter().collect();
            let text = sql::substitute(&text, &params)?;
            let batches = sql::query(open_store(&store)?, &text).await?;
            print!("{}", sql::render(&batches, format)?);
            if format == OutputFormat::Table {
                println!();
            }
        }
        Command::Files { date, store } => {
            let store = open_store(&store)?;
            for (path, _, range) in
                pulse_batch::layout::committed_files(store.as_ref(), date).await?
            {
                println!(
                    "{path}  (partition {}, offsets {}..={})",
                    range.partition, range.first, range.last
                );
            }
        }
    }
    Ok(())
}
