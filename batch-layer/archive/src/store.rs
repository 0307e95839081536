//! Opening the object store the archive lives in: a local directory by default, `s3://` or
//! `gs://` by configuration only.

use std::sync::Arc;

use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;

#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Where the archive lives: a local directory (or `file:///abs/path`), `s3://bucket/prefix`
    /// or `gs://bucket/prefix`.
    #[arg(
        id = "archive_url",
        long = "archive-url",
        env = "PULSE_ARCHIVE_URL",
        default_value = ".run/archive"
    )]
    pub url: String,
    /// Object-store options for the cloud backends, passed through (e.g.
    /// `google_service_account=/path/key.json`, `aws_region=eu-west-1`, `aws_endpoint=…`).
    #[arg(long = "store-opt", env = "PULSE_STORE_OPTS", value_parser = pulse_core::kafka::parse_key_value, value_delimiter = ';')]
    pub store_options: Vec<(String, String)>,
}

impl StoreArgs {
    pub fn local(path: &std::path::Path) -> Self {
        Self {
            url: path.display().to_string(),
            store_options: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("archive URL {0}: {1}")]
    Url(String, String),
    #[error("archive directory {0}: {1}")]
    Dir(String, std::io::Error),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
}

pub fn open_store(args: &StoreArgs) -> Result<Arc<dyn ObjectStore>, OpenError> {
    let local = args
        .url
        .strip_prefix("file://")
        .or((!args.url.contains("://")).then_some(args.url.as_str()));
    if let Some(path) = local {
        std::fs::create_dir_all(path).map_err(|e| OpenError::Dir(path.into(), e))?;
        let abs = std::fs::canonicalize(path).map_err(|e| OpenError::Dir(path.into(), e))?;
        return Ok(Arc::new(LocalFileSystem::new_with_prefix(abs)?));
    }
    let url = url_parse(&args.url)?;
    let (store, prefix) = object_store::parse_url_opts(&url, args.store_options.iter().cloned())?;
    if prefix.as_ref().is_empty() {
        Ok(Arc::from(store))
    } else {
        Ok(Arc::new(PrefixStore::new(store, prefix)))
    }
}

fn url_parse(s: &str) -> Result<url::Url, OpenError> {
    url::Url::parse(s).map_err(|e| OpenError::Url(s.into(), e.to_string()))
}
