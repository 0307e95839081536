//! Baseline for `bench/recompute`: read every committed file of a local archive with the
//! arrow Parquet reader (all columns decoded), nothing else: no events built, no fold, no
//! writes. Prints events/s and the bytes read.

use std::time::Instant;

use clap::Parser;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use pulse_archive::layout;
use pulse_archive::store::{open_store, StoreArgs};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    store: StoreArgs,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let store = open_store(&a.store)?;
    let started = Instant::now();
    let (mut rows, mut bytes, mut files) = (0u64, 0u64, 0u64);
    for file in layout::committed_files(store.as_ref(), None).await? {
        let data = object_store::ObjectStoreExt::get(store.as_ref(), &file.path)
            .await?
            .bytes()
            .await?;
        bytes += data.len() as u64;
        files += 1;
        for batch in ParquetRecordBatchReaderBuilder::try_new(data)?.build()? {
            rows += batch?.num_rows() as u64;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "rows": rows,
            "files": files,
            "bytes": bytes,
            "elapsed_secs": secs,
            "events_per_sec": rows as f64 / secs.max(1e-9),
        })
    );
    Ok(())
}
