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
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use crate::metrics as m;
use crate::triggers::TriggerMessage;

#[derive(Debug, Clone, clap::Args)]
pub struct NotifierConfig {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[arg(
        long = "triggers-topic",
        env = "PULSE_TRIGGERS_TOPIC",
        default_value = "triggers"
    )]
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
    #[arg(
        long,
        env = "PULSE_NOTIFIER_METRICS_LISTEN",
        default_value = "0.0.0.0:9102"
    )]
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

    /// Consumes triggers until `stop` resolves.
    pub async fn run(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), rdkafka::error::KafkaError> {
        let consumer: StreamConsumer = self
            .config
            .kafka
            .consumer_config(&self.config.group)
            .create()?;
        consumer.subscribe(&[&self.config.topic])?;
        tracing::info!(topic = %self.config.topic, webhook = %self.config.webhook_url, "notifier consuming");
        tokio::pin!(stop);
        loop {
            let msg = tokio::select! {
                _ = &mut stop => break,
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
                Ok(trigger) => self.handle(&trigger).await,
                Err(e) => Outcome::DeadLettered(format!("not a trigger message: {e}")),
            };
            if let Outcome::DeadLettered(reason) = &outcome {
                self.dead_letter(&key, &payload, reason).await;
            }
            tracing::debug!(?outcome, offset = msg.offset(), "trigger handled");
            if let Err(e) = consumer.commit_message(&msg, CommitMode::Async) {
                tracing::warn!(error = %e, "commit failed");
            }
        }
        tracing::info!("notifier stopped");
        Ok(())
    }

    /// Dedupe, rate limit, deliver with retries.
    pub async fn handle(&mut self, trigger: &TriggerMessage) -> Outcome {
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
        let mut last_error = String::new();
        for attempt in 0..self.config.max_attempts.max(1) {
            if attempt > 0 {
                metrics::counter!(m::NOTIFY_RETRIES).increment(1);
                let wait = self
                    .config
                    .backoff_ms
                    .saturating_mul(1 << (attempt - 1).min(10));
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            let result = self
                .http
                .post(&self.config.webhook_url)
                .header("Idempotency-Key", &trigger.idempotency_key)
                .json(&body)
                .send()
                .await;
            match result {
                Ok(resp) if resp.status().is_success() => {
                    self.delivered.put(trigger.idempotency_key.clone(), ());
                    self.last_push.put(user, Instant::now());
                    metrics::counter!(m::NOTIFY_DELIVERED).increment(1);
                    let latency =
                        (Utc::now().timestamp_millis() - trigger.fired_at).max(0) as f64 / 1000.0;
                    metrics::histogram!(m::NOTIFY_LATENCY).record(latency);
                    return Outcome::Delivered;
                }
                Ok(resp) => {
                    let status = resp.status();
                    last_error = format!("webhook answered {status}");
                    // A 4xx other than 408/429 will not change with retries.
                    if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429
                    {
                        break;
                    }
                }
                Err(e) => last_error = format!("webhook unreachable: {e}"),
            }
            tracing::warn!(key = %trigger.idempotency_key, attempt, error = %last_error, "delivery failed");
        }
        Outcome::DeadLettered(last_error)
    }

    async fn dead_letter(&self, key: &str, payload: &[u8], reason: &str) {
        metrics::counter!(m::NOTIFY_DEAD_LETTERED).increment(1);
        tracing::error!(key, reason, "trigger to dead-letter topic");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "pulse.error",
                value: Some(reason),
            })
            .insert(Header {
                key: "pulse.consumer",
                value: Some("notifier"),
            });
        let record = FutureRecord::to(&self.config.dlq_topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        // Until the dead letter is in Kafka the offset is not committed: wait for it.
        if let Err((e, _)) = self.producer.send(record, Duration::from_secs(60)).await {
            tracing::error!(error = %e, "dead letter not written; trigger will be re-read after restart");
        }
    }
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
