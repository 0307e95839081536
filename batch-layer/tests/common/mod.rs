//! Shared by the batch-layer integration tests: an archive fixture (a fresh topic, a fresh
//! archive directory, the real `pulse-archiver` binary) and the BI report runner.

#![allow(dead_code)] // each test file uses its own subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use pulse_batch::layout;
use pulse_batch::sql;
use pulse_batch::store::{open_store, StoreArgs};
use pulse_core::Event;
use pulse_tests::data::produce;
pub use pulse_tests::proxy::CutProxy;
pub use pulse_tests::refusing_proxy::RefusingProxy;
use pulse_tests::{brokers, create_topic, unique};
use serde_json::Value;

pub struct Fixture {
    pub topic: String,
    pub dlq: String,
    pub dir: PathBuf,
    pub group: String,
    /// The archive's object store: `dir` by default.
    pub store: StoreArgs,
}

impl Fixture {
    pub async fn new(name: &str, partitions: i32) -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/test-archives")
            .join(unique(name));
        Self::in_dir(name, partitions, dir).await
    }

    /// An archive in `dir` (e.g. under the directory the BigQuery emulator reads gs:// from).
    pub async fn in_dir(name: &str, partitions: i32, dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let store = StoreArgs::local(&dir);
        Self::with_store(name, partitions, store, dir).await
    }

    /// An archive in a fresh bucket of the stack's S3-compatible server (moto).
    pub async fn on_s3(name: &str, partitions: i32) -> Self {
        let endpoint = s3_endpoint();
        Self::on_s3_at(name, partitions, &endpoint, &endpoint).await
    }

    /// On the S3 server, reached by the archiver (and by [`Fixture::rows`]) through a proxy
    /// the test can cut.
    pub async fn on_s3_through_proxy(name: &str, partitions: i32) -> (Self, CutProxy) {
        let endpoint = s3_endpoint();
        let target = endpoint.trim_start_matches("http://").to_string();
        let proxy = CutProxy::start("127.0.0.1:0", &target).await;
        let through = format!("http://{}", proxy.addr);
        (
            Self::on_s3_at(name, partitions, &endpoint, &through).await,
            proxy,
        )
    }

    /// On the S3 server, reached through an HTTP proxy that refuses `PUT`s while told to
    /// (reads, lists and deletes pass).
    pub async fn on_s3_through_put_refusing_proxy(
        name: &str,
        partitions: i32,
    ) -> (Self, RefusingProxy) {
        let endpoint = s3_endpoint();
        let proxy = RefusingProxy::s3_puts(&endpoint).await;
        let url = proxy.url.clone();
        (
            Self::on_s3_at(name, partitions, &endpoint, &url).await,
            proxy,
        )
    }

    /// A fresh bucket made on `endpoint`, used by the archiver at `used_at`.
    async fn on_s3_at(name: &str, partitions: i32, endpoint: &str, used_at: &str) -> Self {
        let bucket = unique("pulse-test");
        let created = reqwest::Client::new()
            .put(format!("{endpoint}/{bucket}"))
            .send()
            .await
            .expect("S3 server (deploy/local/stack up)");
        assert!(created.status().is_success(), "create bucket: {created:?}");
        let opts = [
            ("aws_endpoint", used_at),
            ("aws_allow_http", "true"),
            ("aws_access_key_id", "pulse-test"),
            ("aws_secret_access_key", "pulse-test"),
            ("aws_region", "us-east-1"),
        ];
        let store = StoreArgs {
            url: format!("s3://{bucket}/archive"),
            store_options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        Self::with_store(name, partitions, store, PathBuf::new()).await
    }

    pub async fn with_store(name: &str, partitions: i32, store: StoreArgs, dir: PathBuf) -> Self {
        Self {
            topic: create_topic(&format!("ar-{name}"), partitions).await,
            dlq: create_topic(&format!("ar-{name}-dlq"), 1).await,
            store,
            dir,
            group: unique("archiver"),
        }
    }

    pub fn spawn(&self, extra: &[&str]) -> Child {
        self.spawn_in(&self.group, extra)
    }

    fn spawn_in(&self, group: &str, extra: &[&str]) -> Child {
        self.command(group, extra)
            .spawn()
            .expect("spawn pulse-archiver")
    }

    /// The archiver's log file for `group`.
    pub fn log_path(group: &str) -> PathBuf {
        pulse_tests::process::log_path(&format!("archiver-{group}"))
    }

    /// The archiver command in consumer group `group`, logging to [`Fixture::log_path`].
    pub fn command(&self, group: &str, extra: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pulse-archiver"));
        cmd.args([
            "--kafka-brokers",
            &brokers(),
            "--events-topic",
            &self.topic,
            "--dlq-topic",
            &self.dlq,
        ])
        .args(["--group", group, "--archive-url", &self.store.url])
        .args(
            self.store
                .store_options
                .iter()
                .flat_map(|(k, v)| ["--store-opt".to_string(), format!("{k}={v}")]),
        )
        .args(extra)
        .env("RUST_LOG", "info,librdkafka=warn")
        .stdout(Stdio::null())
        .stderr(pulse_tests::process::log_file(&format!("archiver-{group}")));
        cmd
    }

    /// Runs the archiver until it has read every partition to its end. It joins a fresh
    /// consumer group: `--stop-at-end` stops when the partitions *assigned* to it are read, and
    /// in the fixture's group SIGKILLed members hold theirs until their session expires. The
    /// archive's progress lives in the object store, so a new group resumes exactly there.
    pub fn run_to_end(&self, extra: &[&str]) {
        let mut args = vec!["--stop-at-end"];
        args.extend_from_slice(extra);
        let status = self
            .spawn_in(&unique("archiver-catch-up"), &args)
            .wait()
            .unwrap();
        assert!(status.success(), "archiver exited with {status}");
    }

    /// Produces `events` a chunk at a time, SIGKILLing and restarting the archiver after
    /// each chunk (at growing delays, so kills land in different phases of a unit), then lets
    /// a last run read everything: the crash schedule of the exactly-once tests.
    pub async fn archive_with_sigkills(&self, events: &[Event], chunk: usize, args: &[&str]) {
        let mut archiver = self.spawn(args);
        for (i, part) in events.chunks(chunk).enumerate() {
            produce(&self.topic, part).await;
            tokio::time::sleep(Duration::from_millis(300 + 200 * i as u64)).await;
            archiver.kill().unwrap();
            let _ = archiver.wait();
            archiver = self.spawn(args);
        }
        archiver.kill().unwrap();
        let _ = archiver.wait();
        self.run_to_end(args);
    }

    pub fn store(&self) -> Arc<dyn object_store::ObjectStore> {
        open_store(&self.store).unwrap()
    }

    /// Every row of the committed files.
    pub async fn rows(&self) -> Vec<RecordBatch> {
        let store = self.store();
        let mut out = Vec::new();
        for file in layout::committed_files(store.as_ref(), None).await.unwrap() {
            let bytes = store.get(&file.path).await.unwrap().bytes().await.unwrap();
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .unwrap()
                .build()
                .unwrap();
            out.extend(reader.map(|b| b.unwrap()));
        }
        out
    }
}

pub fn report(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../warehouse-sql/reports")
            .join(name),
    )
    .unwrap()
}

pub async fn run_report(
    store: Arc<dyn object_store::ObjectStore>,
    name: &str,
    start: &str,
    end: &str,
) -> Vec<Value> {
    let params: BTreeMap<String, String> = [
        ("start".to_string(), start.to_string()),
        ("end".to_string(), end.to_string()),
    ]
    .into();
    let text = sql::substitute(&report(name), &params).unwrap();
    let batches = sql::query(store, &text)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let json = sql::render(&batches, sql::OutputFormat::Json).unwrap();
    if json.trim().is_empty() {
        return vec![];
    }
    serde_json::from_str(&json).unwrap()
}

/// The S3-compatible server of the local stack.
fn s3_endpoint() -> String {
    std::env::var("PULSE_S3_ENDPOINT").unwrap_or_else(|_| "http://localhost:9000".into())
}
