//! Prometheus metrics of the ingest service.

use metrics_exporter_prometheus::PrometheusHandle;

pub const REQUESTS: &str = "pulse_ingest_requests_total";
pub const EVENTS_ACCEPTED: &str = "pulse_ingest_events_accepted_total";
pub const EVENTS_REJECTED: &str = "pulse_ingest_events_rejected_total";
/// Events of erased people left out (answered as accepted, or refused with 403).
pub const EVENTS_SUPPRESSED: &str = "pulse_ingest_events_suppressed_total";
pub const PRODUCE_LATENCY: &str = "pulse_ingest_produce_latency_seconds";
pub const REQUEST_EVENTS: &str = "pulse_ingest_request_events";

/// The process-wide recorder (`pulse_service::ops`), with ingest's histogram buckets.
pub fn prometheus() -> PrometheusHandle {
    pulse_service::ops::recorder(&[
        (
            PRODUCE_LATENCY,
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0,
            ],
        ),
        (
            REQUEST_EVENTS,
            &[1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0],
        ),
    ])
}
