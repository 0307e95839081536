//! Baselines for the side-by-side benchmarks in `bench/`. Each baseline does the least work
//! that produces the same result as the Pulse component it is compared with.

use pulse_loadgen::{partners_from_keys_file, Clickstream, ClickstreamConfig};

/// The benches' clickstream, the same for every bench that generates one: the partners of a
/// write-keys file, Zipf-distributed users, 256 concurrent sessions, a seed.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamArgs {
    #[arg(long, default_value = "deploy/local/write-keys.json")]
    pub keys_file: std::path::PathBuf,
    #[arg(long, default_value_t = 100_000)]
    pub users: u64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Share of users who log in on a device they also browse with anonymously (see
    /// `ClickstreamConfig::login_share`).
    #[arg(long, default_value_t = 0.0)]
    pub login_share: f64,
}

impl StreamArgs {
    pub fn stream(&self) -> anyhow::Result<Clickstream> {
        Ok(Clickstream::new(ClickstreamConfig {
            partners: partners_from_keys_file(&self.keys_file)?,
            users: self.users,
            zipf_exponent: 1.1,
            concurrent_sessions: 256,
            seed: self.seed,
            login_share: self.login_share,
        }))
    }
}
