//! `pulse-profile-api`: profile lookups for portals (`/api/v1/getGender/{cid}`).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use pulse_service::keys::{KeyKind, PartnerKeys};
use pulse_speed::api::{router, ApiState};
use pulse_speed::store::{EsArgs, ProfileStore};

#[derive(Parser)]
#[command(name = "pulse-profile-api", about = "Pulse profile lookup API", version)]
struct Cli {
    #[arg(long, env = "PULSE_PROFILE_API_LISTEN", default_value = "0.0.0.0:8081")]
    listen: std::net::SocketAddr,
    #[command(flatten)]
    es: EsArgs,
    /// JSON file mapping secret read keys to partner ids: `{"key": "partner_id", …}`. A read
    /// key reads its own partner's profiles, nothing else.
    #[arg(long, env = "PULSE_READ_KEYS_FILE")]
    read_keys_file: Option<PathBuf>,
    /// A read key as KEY=PARTNER_ID (repeatable; comma-separated in the environment).
    #[arg(long = "read-key", env = "PULSE_READ_KEYS", value_delimiter = ',')]
    read_keys: Vec<String>,
    /// Ingest's write keys file (optional): a write key sent here is then answered 403 "needs
    /// a read key" rather than 401 "unknown", and a key in both files is refused at start.
    #[arg(long, env = "PULSE_WRITE_KEYS_FILE")]
    write_keys_file: Option<PathBuf>,
    #[arg(long = "write-key", env = "PULSE_WRITE_KEYS", value_delimiter = ',')]
    write_keys: Vec<String>,
    /// Window of MODEL3, in days (as on the speed layer).
    #[arg(long, env = "PULSE_GENDER_WINDOW_DAYS", default_value_t = 7)]
    window_days: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pulse_core::telemetry::init_tracing();
    pulse_core::telemetry::exit_on_panic();
    let cli = Cli::parse();
    pulse_speed::models::windowed_gender::set_window_days(cli.window_days);
    let read_keys =
        PartnerKeys::load_kind(KeyKind::Read, cli.read_keys_file.as_deref(), &cli.read_keys)?;
    let write_keys = if cli.write_keys_file.is_some() || !cli.write_keys.is_empty() {
        Some(PartnerKeys::load(
            cli.write_keys_file.as_deref(),
            &cli.write_keys,
        )?)
    } else {
        None
    };
    let shutdown = pulse_service::Shutdown::on_signals();
    let state = ApiState::new(ProfileStore::new(&cli.es)?, read_keys, write_keys)?;
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    tracing::info!(listen = %cli.listen, "profile API listening");
    axum::serve(listener, router(Arc::new(state)))
        .with_graceful_shutdown(async move { shutdown.stopped().await })
        .await?;
    Ok(())
}
