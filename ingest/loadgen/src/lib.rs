//! `pulse-loadgen`: realistic clickstream ([`clickstream`]) for the demo, the tests and the
//! benchmarks, and a runner ([`runner`]) that posts it to ingest over HTTP. Its own crate, so
//! that what it needs (random distributions, latency histograms) is not compiled into
//! every service that links ingest.

pub mod clickstream;
pub mod runner;

pub use clickstream::{write_ndjson, Clickstream, ClickstreamConfig, Generated, Partner};
pub use runner::{run, LoadConfig, LoadError, LoadReport};

use pulse_service::keys::{KeysError, WriteKeys};

/// The partners of a write-keys file (the format ingest reads, see `pulse_service::keys`),
/// in a stable order (by key).
pub fn partners_from_keys_file(path: &std::path::Path) -> Result<Vec<Partner>, KeysError> {
    let keys = WriteKeys::load(Some(path), &[])?;
    Ok(keys
        .by_key()
        .into_iter()
        .map(|(key, id)| Partner {
            id: id.to_string(),
            key: key.to_string(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generator reads the keys file ingest reads, also with a partner's allowed origins
    /// (the object form), which a map of strings could not.
    #[test]
    fn partners_come_from_the_keys_file_ingest_reads() {
        let path = std::env::temp_dir().join(format!("loadgen-keys-{}.json", std::process::id()));
        std::fs::write(
            &path,
            r#"{"kb": "b", "ka": {"partner": "a", "origins": ["https://a.example"]}}"#,
        )
        .unwrap();
        let partners = partners_from_keys_file(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let got: Vec<(&str, &str)> = partners
            .iter()
            .map(|p| (p.key.as_str(), p.id.as_str()))
            .collect();
        assert_eq!(got, vec![("ka", "a"), ("kb", "b")]);
    }
}
