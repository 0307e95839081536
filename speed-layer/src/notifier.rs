//! The notifier: delivers fired triggers to the partner's push webhook.
//!
//! Its own consumer group on `triggers`. Each trigger is delivered at most once per
//! idempotency key (the key also travels as the `Idempotency-Key` header, so the receiver can
//! deduplicate across notifier restarts), at most once per user per rate-limit window, with
//! retries and exponential backoff; after the last attempt it goes to the dead-letter topic.
//! Offsets are committed after a trigger was delivered, dead-lettered or deliberately skipped.

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use chrono::Utc;
use lru::LruCache;
use pulse_core::kafka::KafkaArgs;
use pulse_service::outbox::{dead_letter_headers, Source};
use pulse_service::{RetryPolicy, Shutdown};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use crate::metrics as m;
use crate::triggers::TriggerMessage;

#[derive(Debug, Clone, clap::Args)]
pub struct NotifierConfig {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[arg(long = "triggers-topic", env = "PULSE_TRIGGERS_TOPIC", default_value = "triggers")]
    pub topic: String,
    /// Where triggers go after the last failed attempt.
    #[arg(
        long = "triggers-dlq-topic",
        env = "PULSE_TRIGGERS_DLQ_TOPIC",
        default_value = "triggers.dlq"
    )]
    pub dlq_topic: String,
    #[arg(long, env = "PULSE_NOTIFIER_GROUP", default_value = "notifier")]
    pub group: String,
    /// The partner's push webhook (FCM-style JSON body).
    #[arg(long, env = "PULSE_WEBHOOK_URL")]
    pub webhook_url: String,
    /// Attempts before dead-lettering.
    #[arg(long, env = "PULSE_WEBHOOK_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// First retry delay in milliseconds; doubles per attempt.
    #[arg(long, env = "PULSE_WEBHOOK_BACKOFF_MS", default_value_t = 200)]
    pub backoff_ms: u64,
    /// At most one push per user per this many seconds (0: no limit).
    #[arg(long, env = "PULSE_PUSH_RATE_LIMIT_SECS", default_value_t = 600)]
    pub rate_limit_secs: u64,
    /// Triggers fired longer ago than this are skipped (a push about yesterday's cart is
    /// noise); matters after downtime or when a new notifier group starts at old triggers.
    /// 0: no limit.
    #[arg(long, env = "PULSE_MAX_TRIGGER_AGE_SECS", default_value_t = 900)]
    pub max_trigger_age_secs: u64,
    #[arg(long, env = "PULSE_WEBHOOK_TIMEOUT_SECS", default_value_t = 10)]
    pub timeout_secs: u64,
    #[arg(long, env = "PULSE_NOTIFIER_METRICS_LISTEN", default_value = "0.0.0.0:9102")]
    pub metrics_listen: std::net::SocketAddr,
}

/// What happened to one trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Duplicate,
    RateLimited,
    Expired,
    DeadLettered(String),
}

/// Delivery state: recently delivered keys and per-user last push times, both bounded.
pub struct Notifier {
    config: NotifierConfig,
    http: reqwest::Client,
    producer: FutureProducer,
    delivered: LruCache<String, ()>,
    last_push: LruCache<String, Instant>,
}

impl Notifier {
    pub fn new(config: NotifierConfig) -> Result<Self, rdkafka::error::KafkaError> {
        let cap = NonZeroUsize::new(1_000_000).expect("non-zero");
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(config.timeout_secs))
                .build()
                .unwrap_or_default(),
            producer: config.kafka.producer_config().create()?,
            delivered: LruCache::new(cap),
            last_push: LruCache::new(cap),
            config,
        })
    }

    /// Consumes triggers until `shutdown` stops the process (also in the middle of a retry).
    pub async fn run(mut self, shutdown: Shutdown) -> Result<(), rdkafka::error::KafkaError> {
        let consumer: StreamConsumer = self
            .config
            .kafka
            .consumer_config(&self.config.group)
            .create()?;
        consumer.subscribe(&[&self.config.topic])?;
        tracing::info!(topic = %self.config.topic, webhook = %self.config.webhook_url, "notifier consuming");
        loop {
            let msg = tokio::select! {
                _ = shutdown.stopped() => break,
                msg = consumer.recv() => msg,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    continue;
                }
            };
            let payload = msg.payload().unwrap_or_default().to_vec();
            let key = msg
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default();
            let outcome = match serde_json::from_slice::<TriggerMessage>(&payload) {
                Ok(trigger) => self.handle(&trigger, &shutdown).await,
                Err(e) => Outcome::DeadLettered(format!("not a trigger message: {e}")),
            };
            if shutdown.is_stopped() && matches!(outcome, Outcome::DeadLettered(_)) {
                // A delivery whose retries the stop cut short: not committed, so the next
                // owner delivers it (a delivered, duplicate or skipped one is committed).
                break;
            }
            if let Outcome::DeadLettered(reason) = &outcome {
                // The commit below covers this trigger: it must be in the dead-letter topic
                // first. Without that (stopping during a Kafka outage) leave it uncommitted.
                if self
                    .dead_letter(&msg, &key, &payload, reason, &shutdown)
                    .await
                    .is_err()
                {
                    break;
                }
            }
            tracing::debug!(?outcome, offset = msg.offset(), "trigger handled");
            if let Err(e) = consumer.commit_message(&msg, CommitMode::Async) {
                tracing::warn!(error = %e, "commit failed");
            }
        }
        tracing::info!("notifier stopped");
        Ok(())
    }

    /// The delivery retries: `--webhook-backoff-ms` doubling (up to 1,024 times it), at most
    /// `--webhook-max-attempts` tries.
    fn delivery_retry(&self) -> RetryPolicy {
        let first = Duration::from_millis(self.config.backoff_ms);
        RetryPolicy::forever(first, first * 1024)
            .with_attempts(self.config.max_attempts.max(1) as usize)
    }

    /// Dedupe, rate limit, deliver with retries.
    pub async fn handle(&mut self, trigger: &TriggerMessage, shutdown: &Shutdown) -> Outcome {
        if self.delivered.contains(&trigger.idempotency_key) {
            metrics::counter!(m::NOTIFY_DUPLICATE).increment(1);
            return Outcome::Duplicate;
        }
        let age_ms = Utc::now().timestamp_millis() - trigger.fired_at;
        if self.config.max_trigger_age_secs > 0
            && age_ms > self.config.max_trigger_age_secs as i64 * 1000
        {
            metrics::counter!(m::NOTIFY_EXPIRED).increment(1);
            return Outcome::Expired;
        }
        let user = trigger.key();
        let window = Duration::from_secs(self.config.rate_limit_secs);
        if !window.is_zero() {
            if let Some(last) = self.last_push.get(&user) {
                if last.elapsed() < window {
                    metrics::counter!(m::NOTIFY_RATE_LIMITED).increment(1);
                    return Outcome::RateLimited;
                }
            }
        }
        let body = push_body(trigger);
        let mut attempts = 0u32;
        let delivered = self
            .delivery_retry()
            .run(
                shutdown,
                "webhook delivery",
                |e: &DeliveryError| e.retryable,
                || {
                    attempts += 1;
                    if attempts > 1 {
                        metrics::counter!(m::NOTIFY_RETRIES).increment(1);
                    }
                    self.deliver(trigger, &body)
                },
            )
            .await;
        match delivered {
            Ok(()) => {
                self.delivered.put(trigger.idempotency_key.clone(), ());
                self.last_push.put(user, Instant::now());
                metrics::counter!(m::NOTIFY_DELIVERED).increment(1);
                let latency =
                    (Utc::now().timestamp_millis() - trigger.fired_at).max(0) as f64 / 1000.0;
                metrics::histogram!(m::NOTIFY_LATENCY).record(latency);
                Outcome::Delivered
            }
            Err(e) => Outcome::DeadLettered(e.into_inner().message),
        }
    }

    /// One POST to the webhook.
    async fn deliver(
        &self,
        trigger: &TriggerMessage,
        body: &serde_json::Value,
    ) -> Result<(), DeliveryError> {
        let result = self
            .http
            .post(&self.config.webhook_url)
            .header("Idempotency-Key", &trigger.idempotency_key)
            .json(body)
            .send()
            .await;
        match result {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(DeliveryError {
                message: format!("webhook answered {}", resp.status()),
                retryable: retryable_status(resp.status().as_u16()),
            }),
            Err(e) => Err(DeliveryError {
                message: format!("webhook unreachable: {e}"),
                retryable: true,
            }),
        }
    }

    /// Writes the trigger to the dead-letter topic with the headers every consumer's dead
    /// letters carry, retrying until Kafka acknowledged it; `Err` only when stopped first.
    async fn dead_letter(
        &self,
        msg: &BorrowedMessage<'_>,
        key: &str,
        payload: &[u8],
        reason: &str,
        shutdown: &Shutdown,
    ) -> Result<(), ()> {
        metrics::counter!(m::NOTIFY_DEAD_LETTERED).increment(1);
        tracing::error!(key, reason, "trigger to dead-letter topic");
        let written = DEAD_LETTER_RETRY
            .run(
                shutdown,
                "dead letter",
                |_| true,
                || {
                    let source = Source {
                        topic: msg.topic(),
                        partition: msg.partition(),
                        offset: msg.offset(),
                    };
                    let headers = dead_letter_headers(reason, source, "notifier");
                    let record = FutureRecord::to(&self.config.dlq_topic)
                        .key(key)
                        .payload(payload)
                        .headers(headers);
                    async move {
                        self.producer
                            .send(record, Duration::from_secs(30))
                            .await
                            .map(|_| ())
                            .map_err(|(e, _)| e)
                    }
                },
            )
            .await;
        written.map_err(|e| {
            tracing::error!(error = %e, "dead letter not written; the trigger stays uncommitted");
        })
    }
}

/// Dead letters are retried until Kafka takes them or the process stops.
const DEAD_LETTER_RETRY: RetryPolicy =
    RetryPolicy::forever(Duration::from_millis(200), Duration::from_secs(10));

/// A failed POST, and whether another attempt may succeed.
#[derive(Debug)]
struct DeliveryError {
    message: String,
    retryable: bool,
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Worth another attempt: a timeout, rate limiting or a server-side error. Any other 4xx
/// will not change with retries.
fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429) || status >= 500
}

/// An FCM-style body (`message.notification` + string-valued `data`).
pub fn push_body(t: &TriggerMessage) -> serde_json::Value {
    let mut data = json!({
        "idempotency_key": t.idempotency_key,
        "rule_id": t.rule_id,
        "partner_id": t.partner_id,
        "user_id": t.user_id,
        "event": t.event,
        "message_id": t.message_id,
        "event_timestamp": t.event_timestamp.to_string(),
        "fired_at": t.fired_at.to_string(),
    });
    if let Some(a) = &t.cart_amount {
        data["cart_amount"] = json!(a);
    }
    if let Some(p) = &t.product_id {
        data["product_id"] = json!(p);
    }
    json!({
        "message": {
            "topic": format!("{}.{}", t.partner_id, t.user_id),
            "notification": {"title": t.template, "body": format!("{} {}", t.event, t.cart_amount.clone().unwrap_or_default()).trim().to_string()},
            "data": data,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which webhook answers are retried: the push provider's transient failures, never a
    /// request it refused for good (a retry would only be refused again, then dead-lettered
    /// later than need be).
    #[test]
    fn transient_answers_are_retried_and_refusals_are_not() {
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(retryable_status(status), "{status}");
        }
        for status in [400, 401, 403, 404, 410, 413, 422] {
            assert!(!retryable_status(status), "{status}");
        }
    }

    #[test]
    fn delivery_retry_follows_the_flags() {
        let config = NotifierConfig {
            kafka: KafkaArgs::with_brokers("localhost:9092"),
            topic: "triggers".into(),
            dlq_topic: "triggers.dlq".into(),
            group: "notifier".into(),
            webhook_url: "http://localhost:1/push".into(),
            max_attempts: 5,
            backoff_ms: 200,
            rate_limit_secs: 0,
            max_trigger_age_secs: 0,
            timeout_secs: 1,
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
        };
        let notifier = Notifier::new(config).unwrap();
        let delays: Vec<Duration> = notifier.delivery_retry().delays().collect();
        assert_eq!(delays.len(), 4, "five attempts, four waits");
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(200));
    }
}
