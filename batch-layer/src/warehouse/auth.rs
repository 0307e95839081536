//! Google credentials for the BigQuery API, as one `Authenticator` shared by the
//! `gcp-bigquery-client` calls and the load-job call this crate makes itself.
//!
//! `gcp-bigquery-client` builds its own authenticators but does not hand them out, so the
//! credential flows are built here from the `yup-oauth2` it re-exports.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::yup_oauth2::authenticator::{
    ApplicationDefaultCredentialsTypes, DefaultAuthenticator,
};
use gcp_bigquery_client::yup_oauth2::{
    self, ApplicationDefaultCredentialsAuthenticator, ApplicationDefaultCredentialsFlowOpts,
    ServiceAccountAuthenticator,
};

const SCOPES: [&str; 1] = ["https://www.googleapis.com/auth/bigquery"];

/// How the loader authenticates to BigQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Application Default Credentials: the key file in `GOOGLE_APPLICATION_CREDENTIALS`, else
    /// the GCE/GKE metadata server (which is how GKE Workload Identity hands out tokens).
    Adc,
    /// A service-account key file (`--bq-key-file`).
    ServiceAccount,
    /// No credentials: for a local emulator only.
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("--bq-auth service-account needs --bq-key-file (PULSE_BQ_KEY_FILE)")]
    MissingKeyFile,
    #[error("reading the service-account key {0}: {1}")]
    KeyFile(PathBuf, std::io::Error),
    #[error("building the {0} authenticator: {1}")]
    Build(&'static str, std::io::Error),
}

pub async fn authenticator(
    mode: AuthMode,
    key_file: Option<&PathBuf>,
) -> Result<Arc<dyn Authenticator>, AuthError> {
    let inner = match mode {
        AuthMode::None => return Ok(Arc::new(NoCredentials)),
        AuthMode::ServiceAccount => {
            let path = key_file.ok_or(AuthError::MissingKeyFile)?;
            let key = yup_oauth2::read_service_account_key(path)
                .await
                .map_err(|e| AuthError::KeyFile(path.clone(), e))?;
            ServiceAccountAuthenticator::builder(key)
                .build()
                .await
                .map_err(|e| AuthError::Build("service-account", e))?
        }
        AuthMode::Adc => {
            let opts = ApplicationDefaultCredentialsFlowOpts::default();
            match ApplicationDefaultCredentialsAuthenticator::builder(opts).await {
                ApplicationDefaultCredentialsTypes::ServiceAccount(b) => b.build().await,
                ApplicationDefaultCredentialsTypes::InstanceMetadata(b) => b.build().await,
            }
            .map_err(|e| AuthError::Build("application-default", e))?
        }
    };
    Ok(Arc::new(GoogleCredentials {
        inner: Arc::new(inner),
    }))
}

/// Tokens from a `yup-oauth2` flow (cached and refreshed by it).
#[derive(Clone)]
struct GoogleCredentials {
    inner: Arc<DefaultAuthenticator>,
}

#[async_trait]
impl Authenticator for GoogleCredentials {
    async fn access_token(&self) -> Result<String, BQError> {
        self.inner
            .token(&SCOPES)
            .await?
            .token()
            .map(str::to_string)
            .ok_or(BQError::NoToken)
    }
}

/// Emulators accept any bearer token; sending one keeps requests shaped like production's.
#[derive(Clone)]
struct NoCredentials;

#[async_trait]
impl Authenticator for NoCredentials {
    async fn access_token(&self) -> Result<String, BQError> {
        Ok("local-emulator".to_string())
    }
}
