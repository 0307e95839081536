//! The notifier: delivers fired triggers to the partner's push webhook.
//!
//! Its own consumer group on `triggers`. Each trigger is delivered at most once per
//! idempotency key (the key also travels as the `Idempotency-Key` header), at most once per
//! user per rate-limit window, with retries and exponential backoff; after the last attempt it
//! goes to the dead-letter topic. A trigger whose event is older than `--max-trigger-age-secs`
//! is skipped. What was pushed to whom is kept in a compacted topic ([`ledger`]), so a restart
//! or a rebalance forgets neither the dedupe nor the rate limit. Offsets are committed after a
//! trigger was delivered (and its push recorded), dead-lettered or deliberately skipped.
//!
//! - `webhook`: the POST, its body and which answers are retried.
//! - [`ledger`]: the pushes per user, in memory and in the state topic.
//! - [`routes`]: which partner's pushes go to which webhook.

pub mod ledger;
pub mod routes;
mod webhook;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use pulse_core::kafka::KafkaArgs;
use pulse_service::consumer::{Commit, GroupContext, PartitionOwner};
use pulse_service::outbox::{dead_letter_headers, fatal_error, is_fatal, Source};
use pulse_service::{Condition, Readiness, RetryError, RetryPolicy, Shutdown};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::metrics as m;
use crate::triggers::TriggerMessage;
use ledger::{LedgerError, PushLedger};
pub use routes::{RoutesError, WebhookRoutes};
pub use webhook::push_body;

use pulse_service::erasures::ErasureFeed;

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
    /// Compacted topic of the pushes per user (dedupe and rate limit); created with the
    /// triggers topic's partition count when missing.
    #[arg(
        long = "state-topic",
        env = "PULSE_NOTIFIER_STATE_TOPIC",
        default_value = "triggers.state"
    )]
    pub state_topic: String,
    /// Erased people's ids (see `pulse_core::erasure`): their triggers are not delivered, and
    /// their push state is forgotten.
    #[arg(long = "erasures-topic", env = "PULSE_ERASURES_TOPIC", default_value = "erasures")]
    pub erasures_topic: String,
    #[arg(long, env = "PULSE_NOTIFIER_GROUP", default_value = "notifier")]
    pub group: String,
    /// Each partner's push webhook (FCM-style JSON body): a JSON file
    /// `{"partner_id": "https://…"}`. A partner's triggers go to its own URL only.
    #[arg(long, env = "PULSE_WEBHOOKS_FILE")]
    pub webhooks_file: Option<std::path::PathBuf>,
    /// The webhook of the partners `--webhooks-file` does not name (a deployment of one
    /// partner, or a gateway that routes by the body's `partner_id`). Without it, their
    /// triggers are dead-lettered.
    #[arg(long, env = "PULSE_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// Attempts before dead-lettering.
    #[arg(long, env = "PULSE_WEBHOOK_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// First retry delay in milliseconds; doubles per attempt.
    #[arg(long, env = "PULSE_WEBHOOK_BACKOFF_MS", default_value_t = 200)]
    pub backoff_ms: u64,
    /// At most one push per user per this many seconds (0: no limit).
    #[arg(long, env = "PULSE_PUSH_RATE_LIMIT_SECS", default_value_t = 600)]
    pub rate_limit_secs: u64,
    /// Triggers whose event happened longer ago than this are skipped (a push about
    /// yesterday's cart is noise): after lag, downtime, a replay, or a new notifier group
    /// starting at old triggers. The event's time counts, bounded by when ingest received it
    /// (a client clock in the future cannot make an old cart look new). 0: no limit.
    #[arg(long, env = "PULSE_MAX_TRIGGER_AGE_SECS", default_value_t = 900)]
    pub max_trigger_age_secs: u64,
    #[arg(long, env = "PULSE_WEBHOOK_TIMEOUT_SECS", default_value_t = 10)]
    pub timeout_secs: u64,
    #[arg(long, env = "PULSE_NOTIFIER_METRICS_LISTEN", default_value = "0.0.0.0:9102")]
    pub metrics_listen: std::net::SocketAddr,
}

impl NotifierConfig {
    /// How long a delivery is remembered for the dedupe: as long as the rate limit or the age
    /// limit reaches (a trigger older than that is skipped anyway), and at least an hour.
    fn ledger_horizon(&self) -> Duration {
        Duration::from_secs(
            self.rate_limit_secs
                .max(self.max_trigger_age_secs)
                .max(3600),
        )
    }
}

/// What happened to one trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Duplicate,
    RateLimited,
    Expired,
    /// Of a person erased since the trigger fired: not delivered.
    Erased,
    DeadLettered(String),
}

pub struct Notifier {
    config: NotifierConfig,
    erasures: ErasureFeed,
    routes: WebhookRoutes,
    http: reqwest::Client,
    producer: FutureProducer,
}

/// The triggers partitions taken from this notifier since the last look: their push state is
/// forgotten, and read again if they come back.
#[derive(Default)]
struct Revoked(Vec<i32>);

impl PartitionOwner for Revoked {
    fn assigned(&mut self, _partitions: &[i32]) {}

    fn revoking(&mut self, _commit: &dyn Commit, partitions: &[i32], _lost: bool) {
        self.0.extend_from_slice(partitions);
    }
}

/// Whether `trigger` is too old to push at `now_ms`: its event happened more than
/// `max_age_secs` ago (0: no limit).
pub fn is_stale(trigger: &TriggerMessage, now_ms: i64, max_age_secs: u64) -> bool {
    max_age_secs > 0 && now_ms - trigger.occurred_at() > max_age_secs as i64 * 1000
}

/// Why a notifier could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Routes(#[from] RoutesError),
}

impl Notifier {
    pub fn new(config: NotifierConfig) -> Result<Self, SetupError> {
        let routes = WebhookRoutes::load(
            config.webhooks_file.as_deref(),
            config.webhook_url.as_deref(),
        )?;
        Ok(Self {
            routes,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(config.timeout_secs))
                .build()
                .unwrap_or_default(),
            producer: config.kafka.producer_config().create()?,
            erasures: ErasureFeed::follow(
                config.kafka.consumer_config("pulse-notifier-erasures"),
                &config.erasures_topic,
            ),
            config,
        })
    }

    /// Consumes triggers until `shutdown` stops the process (also in the middle of a retry).
    /// `ready` turns false, with the reason, while Kafka refuses the push state or the dead
    /// letters (the triggers wait uncommitted meanwhile).
    pub async fn run(self, shutdown: Shutdown, ready: &Readiness) -> Result<(), LedgerError> {
        let config = &self.config;
        let kafka = KafkaCalls {
            healthy: ready.condition(
                "Kafka refuses the push state or the dead letters; triggers wait uncommitted",
            ),
        };
        let mut ledger = PushLedger::open(
            &config.kafka,
            &config.topic,
            &config.state_topic,
            config.ledger_horizon(),
            kafka.clone(),
        )
        .await?;
        self.erasures
            .loaded(pulse_service::erasures::LOAD_PATIENCE)
            .await
            .map_err(|e| LedgerError::Erasures(e.to_string()))?;
        let revoked = Arc::new(Mutex::new(Revoked::default()));
        let context = GroupContext::new(revoked.clone(), &config.topic);
        let consumer: StreamConsumer<GroupContext<Revoked>> = config
            .kafka
            .consumer_config(&config.group)
            .create_with_context(context)?;
        consumer.subscribe(&[&config.topic])?;
        tracing::info!(topic = %config.topic, webhooks = %self.routes.describe(), state = %config.state_topic, "notifier consuming");
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
            let gone = std::mem::take(&mut pulse_service::consumer::lock(&revoked).0);
            ledger.forget(&gone);
            let partition = msg.partition();
            if !ledger.is_restored(partition) {
                // Every assigned partition not restored yet, at once: restored one by one as
                // each one's first trigger came, ten partitions cost 1.7 s in a row at start
                // (bench/triggers), with the pushes waiting.
                let mut todo: Vec<i32> = consumer
                    .assignment()
                    .map(|a| {
                        a.elements_for_topic(&config.topic)
                            .iter()
                            .map(|e| e.partition())
                            .collect()
                    })
                    .unwrap_or_default();
                todo.retain(|p| !ledger.is_restored(*p));
                if !todo.contains(&partition) {
                    todo.push(partition);
                }
                let read = kafka
                    .run(&shutdown, "push state restore", || ledger.read_all(&todo))
                    .await;
                match read {
                    Ok(all) => {
                        for (p, records) in all {
                            ledger.restored(p, records);
                        }
                    }
                    // Stopped: the trigger stays uncommitted for the next owner.
                    Err(_) => break,
                }
            }
            let payload = msg.payload().unwrap_or_default().to_vec();
            let key = msg
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default();
            let outcome = match serde_json::from_slice::<TriggerMessage>(&payload) {
                Ok(trigger) => {
                    match self
                        .handle(&mut ledger, &trigger, partition, &shutdown)
                        .await
                    {
                        Some(outcome) => outcome,
                        // Stopped before the push was recorded: uncommitted, pushed again by
                        // the next owner, which is the one duplicate a crash can cause.
                        None => break,
                    }
                }
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
                    .dead_letter(&kafka, &msg, &key, &payload, reason, &shutdown)
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
        // A producer that failed for good ends the loop (its retries stop on it): exit with
        // the error, so the restart, with fresh producers, handles the uncommitted triggers.
        let fatal = fatal_error(self.producer.client()).or_else(|| ledger.fatal_error());
        if let Some(reason) = fatal {
            tracing::error!(reason, "a Kafka producer failed for good; stopping");
            return Err(LedgerError::Producer(reason));
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

    /// Dedupe, age, rate limit, deliver with retries, record the push. `None` when the
    /// process stopped after the delivery but before the push was recorded.
    async fn handle(
        &self,
        ledger: &mut PushLedger,
        trigger: &TriggerMessage,
        partition: i32,
        shutdown: &Shutdown,
    ) -> Option<Outcome> {
        let user = trigger.key();
        if self
            .erasures
            .read()
            .contains(&trigger.partner_id, &trigger.user_id)
        {
            // The person's state goes too: `pulse-admin users erase` writes its tombstone.
            ledger.forget_user(&user);
            metrics::counter!(m::NOTIFY_ERASED).increment(1);
            return Some(Outcome::Erased);
        }
        if ledger.delivered(&user, &trigger.idempotency_key) {
            metrics::counter!(m::NOTIFY_DUPLICATE).increment(1);
            return Some(Outcome::Duplicate);
        }
        let now_ms = Utc::now().timestamp_millis();
        if is_stale(trigger, now_ms, self.config.max_trigger_age_secs) {
            metrics::counter!(m::NOTIFY_EXPIRED).increment(1);
            return Some(Outcome::Expired);
        }
        let window_ms = self.config.rate_limit_secs as i64 * 1000;
        if window_ms > 0
            && ledger
                .last_push_ms(&user)
                .is_some_and(|last| now_ms - last < window_ms)
        {
            metrics::counter!(m::NOTIFY_RATE_LIMITED).increment(1);
            return Some(Outcome::RateLimited);
        }
        let Some(url) = self.routes.url_for(&trigger.partner_id) else {
            return Some(Outcome::DeadLettered(format!(
                "no webhook for partner {:?}: add it to --webhooks-file (its pushes go to no \
                 other partner's endpoint)",
                trigger.partner_id
            )));
        };
        let body = push_body(trigger);
        let mut attempts = 0u32;
        let delivered = self
            .delivery_retry()
            .run(
                shutdown,
                "webhook delivery",
                |e: &webhook::DeliveryError| e.retryable,
                || {
                    attempts += 1;
                    if attempts > 1 {
                        metrics::counter!(m::NOTIFY_RETRIES).increment(1);
                    }
                    webhook::post(&self.http, url, trigger, &body)
                },
            )
            .await;
        if let Err(e) = delivered {
            return Some(Outcome::DeadLettered(e.into_inner().message));
        }
        metrics::counter!(m::NOTIFY_DELIVERED).increment(1);
        let latency = (Utc::now().timestamp_millis() - trigger.fired_at).max(0) as f64 / 1000.0;
        metrics::histogram!(m::NOTIFY_LATENCY).record(latency);
        let now_ms = Utc::now().timestamp_millis();
        ledger
            .record(partition, &user, &trigger.idempotency_key, now_ms, shutdown)
            .await
            .ok()?;
        Some(Outcome::Delivered)
    }
    /// Writes the trigger to the dead-letter topic with the headers every consumer's dead
    /// letters carry, retrying until Kafka acknowledged it; `Err` only when stopped first.
    async fn dead_letter(
        &self,
        kafka: &KafkaCalls,
        msg: &BorrowedMessage<'_>,
        key: &str,
        payload: &[u8],
        reason: &str,
        shutdown: &Shutdown,
    ) -> Result<(), ()> {
        metrics::counter!(m::NOTIFY_DEAD_LETTERED).increment(1);
        tracing::error!(key, reason, "trigger to dead-letter topic");
        let written = kafka
            .run(shutdown, "dead letter", || {
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
            })
            .await;
        written.map_err(|e| {
            tracing::error!(error = %e, "dead letter not written; the trigger stays uncommitted");
        })
    }
}

/// Dead letters and the push state are written (and read) until Kafka answers or the
/// process stops: a trigger is neither committed nor handled without them.
const KAFKA_RETRY: RetryPolicy =
    RetryPolicy::forever(Duration::from_millis(200), Duration::from_secs(10));

/// The Kafka calls a trigger waits for (the push state, dead letters), retried as
/// [`KAFKA_RETRY`] says until Kafka answers, the process stops or the producer fails for good.
/// While they fail the notifier is not ready and `pulse_notifier_kafka_failures_total` counts,
/// so a topic that refuses writes shows on `/readyz` and the metrics, not only in the log.
#[derive(Clone)]
pub struct KafkaCalls {
    healthy: Condition,
}

impl KafkaCalls {
    pub async fn run<T, F, Fut>(
        &self,
        shutdown: &Shutdown,
        what: &str,
        mut op: F,
    ) -> Result<T, RetryError<KafkaError>>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, KafkaError>>,
    {
        KAFKA_RETRY
            .run(
                shutdown,
                what,
                |e| !is_fatal(e),
                || {
                    let call = op();
                    let healthy = self.healthy.clone();
                    async move {
                        let result = call.await;
                        healthy.observe(&result, m::NOTIFY_KAFKA_FAILURES);
                        result
                    }
                },
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::triggers::RuleSet;
    use pulse_core::{parse_event, ParseContext};

    #[test]
    fn delivery_retry_follows_the_flags() {
        let config = NotifierConfig {
            kafka: KafkaArgs::with_brokers("localhost:9092"),
            topic: "triggers".into(),
            dlq_topic: "triggers.dlq".into(),
            state_topic: "triggers.state".into(),
            erasures_topic: "erasures".into(),
            group: "notifier".into(),
            webhooks_file: None,
            webhook_url: Some("http://localhost:1/push".into()),
            max_attempts: 5,
            backoff_ms: 200,
            rate_limit_secs: 0,
            max_trigger_age_secs: 0,
            timeout_secs: 1,
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
        };
        assert_eq!(config.ledger_horizon(), Duration::from_secs(3600));
        let notifier = Notifier::new(config).unwrap();
        let delays: Vec<Duration> = notifier.delivery_retry().delays().collect();
        assert_eq!(delays.len(), 4, "five attempts, four waits");
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(200));
    }

    /// The age of a trigger counts from its event, not from when the speed layer fired it:
    /// a cart two hours old, read after lag or in a replay, is not pushed; and a client clock
    /// in the future is bounded by the ingest time.
    #[test]
    fn a_cart_two_hours_old_is_stale_however_recently_it_was_fired() {
        let rules = RuleSet::from_toml(
            "[[rule]]\nid = \"cart\"\npartner = \"*\"\nevent = \"add_to_cart\"\ntemplate = \"t\"\n",
        )
        .unwrap();
        let now = Utc::now();
        let cart = |at: chrono::DateTime<Utc>| {
            let json = format!(
                r#"{{"event":"add_to_cart","partner_id":"p","user_id":"u","timestamp":"{}"}}"#,
                at.to_rfc3339()
            );
            parse_event(&json, &ParseContext::now()).unwrap()
        };
        let now_ms = now.timestamp_millis();
        let old = TriggerMessage::new(
            &rules.rules[0],
            &cart(now - chrono::Duration::hours(2)),
            now_ms,
        );
        assert!(is_stale(&old, now_ms, 900));
        assert!(!is_stale(&old, now_ms, 0), "0: no limit");
        let fresh = TriggerMessage::new(&rules.rules[0], &cart(now), now_ms);
        assert!(!is_stale(&fresh, now_ms, 900));
        // A timestamp a day ahead counts as the ingest time: an hour later it is stale.
        let ahead = TriggerMessage::new(
            &rules.rules[0],
            &cart(now + chrono::Duration::days(1)),
            now_ms,
        );
        assert!(!is_stale(&ahead, now_ms, 900));
        assert!(is_stale(&ahead, now_ms + 3_600_000, 900));
    }
}
