//! Logging setup shared by every binary.

use tracing_subscriber::EnvFilter;

/// Installs the `tracing` subscriber: `RUST_LOG` filters (default `info`), and
/// `PULSE_LOG_FORMAT=json` gives one JSON object per line for log shippers.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("PULSE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests start several services in one process) is harmless: keep the first.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
