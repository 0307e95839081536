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

/// Makes a panic on any thread end the process (abort, non-zero exit) after logging it.
///
/// Rust's default only ends the panicking thread: a consumer whose worker thread died keeps
/// the process alive, answering health checks while it folds nothing for anyone. Ending the
/// process lets the orchestrator restart it, and the restart resumes from committed offsets.
pub fn exit_on_panic() {
    exit_on_panic_with(|_| {});
}

/// [`exit_on_panic`], calling `last_words` with the panic message first (the speed layer
/// records which record it was folding, to dead-letter that record on the restart).
pub fn exit_on_panic_with(last_words: impl Fn(&str) + Send + Sync + 'static) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Last words first: logging could itself fail.
        let message = panic_message(info);
        last_words(&message);
        default(info);
        tracing::error!(panic = %message, "panic: ending the process so that it is restarted");
        std::process::abort();
    }));
}

/// The panic's message and where it happened.
pub fn panic_message(info: &std::panic::PanicHookInfo<'_>) -> String {
    let payload = info.payload();
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_string());
    match info.location() {
        Some(l) => format!("{text} at {}:{}", l.file(), l.line()),
        None => text,
    }
}
