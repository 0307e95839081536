//! The operations endpoint every Pulse service exposes: `/healthz` (the process answers),
//! `/readyz` (it can do its work: 503 with the reason otherwise) and Prometheus `/metrics`,
//! and the one process-wide Prometheus recorder behind it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::Shutdown;

/// The process-wide Prometheus recorder, installed by the first call; `buckets` gives
/// histogram buckets by metric name (without them a histogram is rendered as a summary).
/// Later calls, as when a test starts several services in one process, get the same handle.
pub fn recorder(buckets: &[(&str, &[f64])]) -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for (name, bounds) in buckets {
                builder =
                    match builder.set_buckets_for_metric(Matcher::Full(name.to_string()), bounds) {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::warn!(metric = name, error = %e, "histogram buckets ignored");
                            PrometheusBuilder::new()
                        }
                    };
            }
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (an embedding program's): render ours unused.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// `/healthz` and `/metrics`, for a service that answers `/readyz` itself (ingest asks Kafka
/// on each probe) and merges these into its own router.
pub fn routes<S: Clone + Send + Sync + 'static>(handle: PrometheusHandle) -> Router<S> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let page = handle.render();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], page) }
            }),
        )
}

/// Whether a service can do its work: its dependencies answer (`set_healthy`, or one
/// [`Condition`] per dependency, so that one call that works does not hide another that
/// fails) and, for a consumer, its loop is still turning (`beat`). A loop that stopped making progress (wedged
/// on a lock, stuck in a call) is not ready even though every dependency is fine, so an
/// orchestrator takes it out of rotation and, with a liveness probe on `/readyz`, restarts it.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<ReadinessState>,
}

struct ReadinessState {
    healthy: AtomicBool,
    /// The conditions made with [`Readiness::condition`], with the reason each gives.
    conditions: Mutex<Vec<(&'static str, Arc<AtomicBool>)>>,
    /// Milliseconds since `started` at the last beat.
    last_beat_ms: AtomicI64,
    started: Instant,
    /// No beat for this long means stalled; `None`: the service has no loop to watch.
    stall_after: Option<Duration>,
    not_ready: &'static str,
}

impl Readiness {
    /// How long a consumer loop may go without a beat before it is reported not ready: far
    /// above one turn (a poll of 100 ms, a batch, a flush), far below "someone noticed".
    pub const STALL_AFTER: Duration = Duration::from_secs(60);

    /// Ready while healthy; `not_ready` is the 503 answer's reason.
    pub fn new(not_ready: &'static str) -> Self {
        Self::build(not_ready, None)
    }

    /// Also not ready when [`Readiness::beat`] has not been called for `stall_after`.
    pub fn with_heartbeat(not_ready: &'static str, stall_after: Duration) -> Self {
        Self::build(not_ready, Some(stall_after))
    }

    fn build(not_ready: &'static str, stall_after: Option<Duration>) -> Self {
        Self {
            inner: Arc::new(ReadinessState {
                healthy: AtomicBool::new(true),
                conditions: Mutex::new(Vec::new()),
                last_beat_ms: AtomicI64::new(0),
                started: Instant::now(),
                stall_after,
                not_ready,
            }),
        }
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.inner.healthy.store(healthy, Ordering::Relaxed);
    }

    /// A condition of its own (true at first): not ready, with `reason`, while it is false,
    /// whatever the others say.
    pub fn condition(&self, reason: &'static str) -> Condition {
        let ok = Arc::new(AtomicBool::new(true));
        self.inner
            .conditions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((reason, ok.clone()));
        Condition { ok }
    }

    /// The loop made progress.
    pub fn beat(&self) {
        let ms = self.inner.started.elapsed().as_millis() as i64;
        self.inner.last_beat_ms.store(ms, Ordering::Relaxed);
    }

    /// `Ok` when ready, else the reason.
    pub fn check(&self) -> Result<(), String> {
        let mut failing: Vec<&str> = Vec::new();
        if !self.inner.healthy.load(Ordering::Relaxed) {
            failing.push(self.inner.not_ready);
        }
        let conditions = self
            .inner
            .conditions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        failing.extend(
            conditions
                .iter()
                .filter(|(_, ok)| !ok.load(Ordering::Relaxed))
                .map(|(reason, _)| *reason),
        );
        if !failing.is_empty() {
            return Err(failing.join("; "));
        }
        if let Some(limit) = self.inner.stall_after {
            let now = self.inner.started.elapsed().as_millis() as i64;
            let quiet = now - self.inner.last_beat_ms.load(Ordering::Relaxed);
            if quiet > limit.as_millis() as i64 {
                return Err(format!(
                    "consumer loop made no progress for {} s",
                    quiet / 1000
                ));
            }
        }
        Ok(())
    }
}

/// One dependency's part of a [`Readiness`].
#[derive(Clone)]
pub struct Condition {
    ok: Arc<AtomicBool>,
}

impl Condition {
    pub fn set(&self, ok: bool) {
        self.ok.store(ok, Ordering::Relaxed);
    }

    /// Takes the outcome of one call to the dependency this condition watches: ready again
    /// after a success; after a failure not ready, and the failure counted in `failures`.
    pub fn observe<T, E>(&self, outcome: &Result<T, E>, failures: &'static str) {
        self.set(outcome.is_ok());
        if outcome.is_err() {
            metrics::counter!(failures).increment(1);
        }
    }
}

/// Serves the endpoint until `shutdown`; `/readyz` answers 503 with the reason while `ready`
/// says the service cannot work.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    ready: Readiness,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let app = routes(handle).route(
        "/readyz",
        get(move || {
            let answer = match ready.check() {
                Ok(()) => (StatusCode::OK, "ready".to_string()),
                Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
            };
            async move { answer }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.stopped().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_health_and_heartbeat() {
        let r = Readiness::with_heartbeat("elasticsearch unavailable", Duration::from_millis(50));
        r.beat();
        assert!(r.check().is_ok());
        r.set_healthy(false);
        assert_eq!(r.check().unwrap_err(), "elasticsearch unavailable");
        r.set_healthy(true);
        std::thread::sleep(Duration::from_millis(120));
        assert!(r
            .check()
            .unwrap_err()
            .starts_with("consumer loop made no progress"));
        r.beat();
        assert!(r.check().is_ok());
        assert!(Readiness::new("x").check().is_ok());
    }

    #[test]
    fn one_condition_that_works_does_not_hide_another_that_fails() {
        let r = Readiness::new("unused");
        let reads = r.condition("elasticsearch reads failing");
        let writes = r.condition("elasticsearch writes failing");
        writes.set(false);
        reads.set(true);
        assert_eq!(r.check().unwrap_err(), "elasticsearch writes failing");
        reads.set(false);
        assert_eq!(
            r.check().unwrap_err(),
            "elasticsearch reads failing; elasticsearch writes failing"
        );
        reads.set(true);
        writes.set(true);
        assert!(r.check().is_ok());
    }
}
