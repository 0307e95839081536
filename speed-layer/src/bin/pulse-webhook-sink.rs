//! `pulse-webhook-sink`: a local push webhook for the demo and for trying rules. Prints each
//! delivery as one JSON line (with its path, Idempotency-Key and arrival time): one sink can
//! stand for every partner's webhook, one path each.

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use clap::Parser;

#[derive(Parser)]
#[command(name = "pulse-webhook-sink", about = "Print push webhook deliveries", version)]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:9099")]
    listen: std::net::SocketAddr,
    /// Answer this status instead of 200 (to watch retries and dead letters).
    #[arg(long, default_value_t = 200)]
    status: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let status = StatusCode::from_u16(cli.status)?;
    let app = Router::new().route(
        "/{*path}",
        post(move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| async move {
            let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("");
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
            println!(
                "{}",
                serde_json::json!({"received_at": chrono::Utc::now().timestamp_millis(), "path": uri.path(), "idempotency_key": key, "body": body})
            );
            status
        }),
    );
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
