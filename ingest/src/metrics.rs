//! Prometheus metrics of the ingest service.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "pulse_ingest_requests_total";
pub const EVENTS_ACCEPTED: &str = "pulse_ingest_events_accepted_total";
pub const EVENTS_REJECTED: &str = "pulse_ingest_events_rejected_total";
pub const PRODUCE_LATENCY: &str = "pulse_ingest_produce_latency_seconds";
pub const REQUEST_EVENTS: &str = "pulse_ingest_request_events";

/// The process-wide recorder. Installed once, even when a test starts several servers.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(PRODUCE_LATENCY.into()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        15.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(REQUEST_EVENTS.into()),
                        &[1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0],
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (an embedding program's): render ours unused.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}
