//! The HTTP service: routes, request handling, readiness and graceful shutdown.
//!
//! Status codes a client can act on:
//! - 200: every event of the request is in Kafka (acks=all).
//! - 400: the body or an event is malformed; nothing of the request was written. The message
//!   names the field and, in a batch, the index of the event.
//! - 401: missing or unknown write key. 403: an event of another partner than the key's, or
//!   (with `--erased-response forbid`) of an erased person.
//! - 413: body or batch too large. 415: unsupported Content-Encoding.
//! - 503 + Retry-After: Kafka did not acknowledge some events; the response lists them. Retry
//!   with the same `message_id`s: downstream deduplicates on them. Also while the erasures
//!   are not read yet (just after start): nothing is written that might be an erased person's.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use chrono::Utc;
use metrics_exporter_prometheus::PrometheusHandle;
use pulse_core::segment::{parse_segment, SegmentCall};
use pulse_core::{parse_event, Event, EventError, Limits, ParseContext};
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::body::{self, BodyError};
use crate::config::IngestConfig;
use crate::metrics::{self as m, prometheus};
use crate::publish::{EventPublisher, PublishError};
use crate::suppress::{self, ErasedResponse, Split};
use pulse_service::erasures::ErasureFeed;
use pulse_service::keys::{AuthFailure, KeysError, WriteKeys};

/// Errors that stop the service from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Keys(#[from] KeysError),
    #[error("creating the Kafka producer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// Shared by all requests.
pub struct AppState {
    keys: WriteKeys,
    publisher: EventPublisher,
    limits: Limits,
    max_body_bytes: usize,
    retry_after_secs: u64,
    prometheus: PrometheusHandle,
    erasures: ErasureFeed,
    erased_response: ErasedResponse,
}

impl AppState {
    pub fn new(config: &IngestConfig) -> Result<Self, IngestError> {
        Ok(Self {
            keys: WriteKeys::load(config.write_keys_file.as_deref(), &config.write_keys)?,
            publisher: EventPublisher::new(&config.kafka, &config.topic)?,
            limits: config.limits(),
            max_body_bytes: config.max_body_bytes,
            retry_after_secs: config.retry_after_secs,
            prometheus: prometheus(),
            erasures: ErasureFeed::follow(
                config.kafka.consumer_config("pulse-ingest-erasures"),
                &config.erasures_topic,
            ),
            erased_response: config.erased_response,
        })
    }
}

/// Segment's call paths: the long form and the one-letter form the official browser and
/// mobile SDKs post to (`/v1/t`, `/v1/b`, …), handled identically.
const SEGMENT_PATHS: &[(&str, &str, Format)] = &[
    ("/v1/track", "/v1/t", Format::Segment(SegmentCall::Track)),
    (
        "/v1/identify",
        "/v1/i",
        Format::Segment(SegmentCall::Identify),
    ),
    ("/v1/page", "/v1/p", Format::Segment(SegmentCall::Page)),
    ("/v1/screen", "/v1/s", Format::Segment(SegmentCall::Screen)),
    ("/v1/alias", "/v1/a", Format::Segment(SegmentCall::Alias)),
    ("/v1/group", "/v1/g", Format::Segment(SegmentCall::Group)),
    ("/v1/batch", "/v1/b", Format::SegmentBatch),
];

fn route_for(format: Format) -> axum::routing::MethodRouter<Arc<AppState>> {
    post(
        move |State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body| async move {
            handle(s, format, headers, body).await
        },
    )
}

/// CORS for browser clients (Segment's analytics.js posts from the partner's pages): any
/// origin may ask (the preflight carries no key, so it cannot be judged per partner); the
/// request itself is then refused with 403 when its key's partner did not allow that origin
/// (see [`check_origin`]). No credentials: keys travel in the body or `Authorization`.
fn cors() -> tower_http::cors::CorsLayer {
    use axum::http::{HeaderName, Method};
    tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::AllowOrigin::mirror_request())
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::CONTENT_ENCODING,
            HeaderName::from_static("x-retry-count"),
        ])
        .max_age(Duration::from_secs(86_400))
}

pub fn router(state: Arc<AppState>) -> Router {
    let mut app = Router::new()
        .route("/v1/events", route_for(Format::Native))
        .route("/v1/import", route_for(Format::SegmentBatch));
    for (long, short, format) in SEGMENT_PATHS {
        app = app
            .route(long, route_for(*format))
            .route(short, route_for(*format));
    }
    app.merge(pulse_service::ops::routes(state.prometheus.clone()))
        .route("/readyz", get(readyz))
        .layer(cors())
        .with_state(state)
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish, and
/// waits for Kafka to acknowledge everything still queued.
pub async fn serve(
    config: IngestConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), IngestError> {
    let state = Arc::new(AppState::new(&config)?);
    let publisher = state.publisher.clone();
    tracing::info!(
        addr = %listener.local_addr()?,
        topic = %config.topic,
        brokers = %config.kafka.brokers,
        keys = state.keys.len(),
        "ingest listening"
    );
    // Responses are small and latency matters: no Nagle delay on accepted connections.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    tracing::info!("draining: waiting for Kafka to acknowledge in-flight events");
    let timeout = config.shutdown_timeout();
    let flushed = tokio::task::spawn_blocking(move || publisher.flush(timeout)).await;
    match flushed {
        Ok(Ok(())) => tracing::info!("ingest stopped cleanly"),
        Ok(Err(e)) => tracing::error!(error = %e, "events still unacknowledged at shutdown"),
        Err(e) => tracing::error!(error = %e, "flush task failed"),
    }
    Ok(())
}

/// Which wire format a route speaks.
#[derive(Debug, Clone, Copy)]
enum Format {
    Native,
    Segment(SegmentCall),
    SegmentBatch,
}

impl Format {
    fn label(self) -> &'static str {
        match self {
            Format::Native => "events",
            Format::Segment(SegmentCall::Track) => "track",
            Format::Segment(SegmentCall::Identify) => "identify",
            Format::Segment(SegmentCall::Page) => "page",
            Format::Segment(SegmentCall::Screen) => "screen",
            Format::Segment(SegmentCall::Alias) => "alias",
            Format::Segment(SegmentCall::Group) => "group",
            Format::SegmentBatch => "batch",
        }
    }
}

async fn handle(state: Arc<AppState>, format: Format, headers: HeaderMap, body: Body) -> Response {
    let response = match accept(&state, format, &headers, body).await {
        Ok(response) => response,
        Err(rejection) => rejection.into_response(state.retry_after_secs),
    };
    metrics::counter!(m::REQUESTS, "endpoint" => format.label(), "status" => response.status().as_str().to_string())
        .increment(1);
    response
}

/// One event's problem, by its index in the request.
#[derive(Debug, Serialize)]
struct ItemError {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_id: Option<String>,
    message: String,
}

/// Errors reported per request are capped: a 2,000-event batch of garbage needs a few
/// examples, not 2,000 lines.
const MAX_ITEM_ERRORS: usize = 50;

/// A request that is not answered 200.
struct Rejection {
    status: StatusCode,
    message: String,
    items: Vec<ItemError>,
    /// Events Kafka did acknowledge in a partly failed request.
    accepted: Option<usize>,
    /// Every message id Kafka did not acknowledge (`items` lists at most the first
    /// [`MAX_ITEM_ERRORS`] with their errors): what the client must send again.
    unacknowledged: Vec<String>,
}

impl Rejection {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            items: Vec::new(),
            accepted: None,
            unacknowledged: Vec::new(),
        }
    }

    fn into_response(self, retry_after_secs: u64) -> Response {
        let mut body = json!({ "error": self.message });
        if !self.items.is_empty() {
            body["errors"] = json!(self.items);
        }
        if let Some(accepted) = self.accepted {
            body["accepted"] = json!(accepted);
        }
        if !self.unacknowledged.is_empty() {
            body["unacknowledged_message_ids"] = json!(self.unacknowledged);
        }
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}

impl From<BodyError> for Rejection {
    fn from(e: BodyError) -> Self {
        let status = match e {
            BodyError::TooLarge { .. } | BodyError::TooManyEvents { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            BodyError::Encoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        reject_events("body", status, e.to_string())
    }
}

fn reject_events(reason: &'static str, status: StatusCode, message: String) -> Rejection {
    metrics::counter!(m::EVENTS_REJECTED, "reason" => reason).increment(1);
    Rejection::new(status, message)
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn accept(
    state: &AppState,
    format: Format,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Rejection> {
    let limit = state.max_body_bytes;
    let declared =
        header_str(headers, header::CONTENT_LENGTH).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge { limit }.into());
    }
    let raw = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| Rejection::from(BodyError::TooLarge { limit }))?;
    let decoded = body::decode(header_str(headers, header::CONTENT_ENCODING), &raw, limit)?;
    let text = body::as_text(&decoded)?;

    let ctx = ParseContext {
        received_at: Utc::now(),
        limits: state.limits,
    };
    let header_partner = state.keys.partner_from_headers(headers);
    let (partner, parsed): (&str, Vec<Result<Event, EventError>>) = match format {
        Format::Native => {
            let partner = authenticated(header_partner)?;
            let ndjson = body::is_ndjson(header_str(headers, header::CONTENT_TYPE));
            let items = body::split_events(text, ndjson, state.limits.max_batch_events)?;
            (
                partner,
                items.iter().map(|t| parse_event(t, &ctx)).collect(),
            )
        }
        Format::Segment(call) => {
            let partner = match header_partner {
                Err(AuthFailure::Missing) => match body::segment_write_key(text) {
                    Some(key) => authenticated(state.keys.partner_of(&key))?,
                    None => authenticated(Err(AuthFailure::Missing))?,
                },
                other => authenticated(other)?,
            };
            (
                partner,
                vec![parse_segment(text, Some(call), partner, &ctx)],
            )
        }
        Format::SegmentBatch => {
            let batch = body::split_segment_batch(text, state.limits.max_batch_events)?;
            let partner = match (header_partner, &batch.write_key) {
                (Err(AuthFailure::Missing), Some(key)) => {
                    authenticated(state.keys.partner_of(key))?
                }
                (other, _) => authenticated(other)?,
            };
            let items = batch
                .batch
                .iter()
                .map(|raw| parse_segment(raw.get(), None, partner, &ctx))
                .collect();
            (partner, items)
        }
    };

    check_origin(state, headers, partner)?;
    let events = validate(parsed, partner)?;
    metrics::histogram!(m::REQUEST_EVENTS).record(events.len() as f64);
    let split = suppress(state, events)?;
    let events = &split.kept;
    let results = state.publisher.publish(events).await;

    let mut failed = Vec::new();
    let mut rejected_by_kafka = false;
    for (index, (event, result)) in events.iter().zip(&results).enumerate() {
        if let Err(e) = result {
            rejected_by_kafka |= matches!(e, PublishError::Rejected(_));
            failed.push(ItemError {
                index: split.index_of(index),
                field: None,
                message_id: Some(event.message_id.clone()),
                message: e.to_string(),
            });
        }
    }
    let accepted = events.len() - failed.len();
    metrics::counter!(m::EVENTS_ACCEPTED).increment(accepted as u64);
    // Answered as accepted (Segment's silent suppression); counted apart.
    let accepted = accepted + split.left_out.len();
    if !failed.is_empty() {
        metrics::counter!(m::EVENTS_REJECTED, "reason" => "kafka").increment(failed.len() as u64);
        tracing::warn!(failed = failed.len(), accepted, first = %failed[0].message, "kafka did not acknowledge events");
        let status = if rejected_by_kafka && failed.len() == events.len() {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let unacknowledged: Vec<String> =
            failed.iter().filter_map(|f| f.message_id.clone()).collect();
        let failed_count = failed.len();
        let listed = if failed.len() > MAX_ITEM_ERRORS {
            format!("; errors lists the first {MAX_ITEM_ERRORS}, unacknowledged_message_ids all of them")
        } else {
            String::new()
        };
        failed.truncate(MAX_ITEM_ERRORS);
        return Err(Rejection {
            status,
            message: format!(
                "{} of {} events were not acknowledged by Kafka; retry them with the same message_id{listed}",
                failed_count,
                events.len() + split.left_out.len()
            ),
            items: failed,
            accepted: Some(accepted),
            unacknowledged,
        });
    }
    let response = match format {
        // Segment's own API answers exactly this; its SDKs only look at the status.
        Format::Segment(_) | Format::SegmentBatch => {
            Json(json!({ "success": true })).into_response()
        }
        Format::Native => Json(json!({
            "accepted": accepted,
            "message_ids": split.message_ids(),
        }))
        .into_response(),
    };
    Ok(response)
}

/// A request from a web page (`Origin` set) must come from an origin the key's partner
/// allows: a write key copied off one shop's site is refused on another's.
fn check_origin(state: &AppState, headers: &HeaderMap, partner: &str) -> Result<(), Rejection> {
    let Some(origin) = header_str(headers, header::ORIGIN) else {
        return Ok(());
    };
    if state.keys.origin_allowed(partner, origin) {
        return Ok(());
    }
    let allowed = state
        .keys
        .allowed_origins(partner)
        .map(|o| o.join(", "))
        .unwrap_or_default();
    Err(reject_events(
        "origin",
        StatusCode::FORBIDDEN,
        format!(
            "origin {} is not allowed for this write key (partner {partner} allows: {allowed})",
            origin.chars().take(200).collect::<String>()
        ),
    ))
}

fn authenticated(result: Result<&str, AuthFailure>) -> Result<&str, Rejection> {
    result.map_err(|failure| {
        let message = match failure {
            AuthFailure::Missing => {
                "missing write key: send it as the HTTP Basic user (Segment style) or as `Authorization: Bearer <key>`"
            }
            AuthFailure::Unknown => "unknown write key",
        };
        reject_events("auth", StatusCode::UNAUTHORIZED, message.to_string())
    })
}

/// All events valid and of the key's partner, or a 400/403 listing the bad ones. A request is
/// all or nothing at this stage, so a client never has to work out which half got in.
fn validate(
    parsed: Vec<Result<Event, EventError>>,
    partner: &str,
) -> Result<Vec<Event>, Rejection> {
    let total = parsed.len();
    let mut events = Vec::with_capacity(total);
    let mut invalid = Vec::new();
    let mut foreign = Vec::new();
    for (index, item) in parsed.into_iter().enumerate() {
        match item {
            Ok(e) if e.partner_id != partner => foreign.push(ItemError {
                index,
                field: Some("partner_id".into()),
                message_id: Some(e.message_id),
                message: format!(
                    "partner_id: \"{}\" is not the partner of this write key",
                    e.partner_id
                ),
            }),
            Ok(e) => events.push(e),
            Err(e) => invalid.push(ItemError {
                index,
                field: e.field.clone(),
                message_id: None,
                message: e.to_string(),
            }),
        }
    }
    if invalid.is_empty() && foreign.is_empty() {
        return Ok(events);
    }
    let (status, reason, mut items) = if invalid.is_empty() {
        (StatusCode::FORBIDDEN, "partner", foreign)
    } else {
        (StatusCode::BAD_REQUEST, "invalid", invalid)
    };
    metrics::counter!(m::EVENTS_REJECTED, "reason" => reason).increment(total as u64);
    let first = &items[0];
    let message = if total == 1 {
        first.message.clone()
    } else {
        format!(
            "{} of {total} events rejected, nothing was written; first: event {}: {}",
            items.len(),
            first.index,
            first.message
        )
    };
    items.truncate(MAX_ITEM_ERRORS);
    Err(Rejection {
        status,
        message,
        items,
        accepted: None,
        unacknowledged: Vec::new(),
    })
}

/// The request's events without those of erased people, or its refusal: 503 while the
/// erasures are not read yet, 403 under `--erased-response forbid`.
fn suppress(state: &AppState, events: Vec<Event>) -> Result<Split, Rejection> {
    if !state.erasures.is_loaded() {
        return Err(reject_events(
            "erasures",
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: the erasures are not read yet; retry".into(),
        ));
    }
    let split = suppress::split(&state.erasures.read(), events);
    if split.left_out.is_empty() {
        return Ok(split);
    }
    metrics::counter!(m::EVENTS_SUPPRESSED).increment(split.left_out.len() as u64);
    if state.erased_response == ErasedResponse::Drop {
        return Ok(split);
    }
    let total = split.kept.len() + split.left_out.len();
    let mut items: Vec<ItemError> = split
        .left_out
        .into_iter()
        .map(|(index, message_id)| ItemError {
            index,
            field: None,
            message_id: Some(message_id),
            message: "the person of this event was erased at the partner's request".into(),
        })
        .collect();
    let message = format!(
        "{} of {total} events are of an erased person; nothing was written",
        items.len()
    );
    items.truncate(MAX_ITEM_ERRORS);
    Err(Rejection {
        status: StatusCode::FORBIDDEN,
        message,
        items,
        accepted: None,
        unacknowledged: Vec::new(),
    })
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if !state.erasures.is_loaded() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "error": "the erasures are not read yet"})),
        )
            .into_response();
    }
    let publisher = state.publisher.clone();
    let check =
        tokio::task::spawn_blocking(move || publisher.check_topic(Duration::from_secs(2))).await;
    match check {
        Ok(Ok(partitions)) => Json(
            json!({"status": "ready", "topic": state.publisher.topic(), "partitions": partitions}),
        )
        .into_response(),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "error": e})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "error": e.to_string()})),
        )
            .into_response(),
    }
}
