//! The outbox of a consumer: the records it writes beside its work (triggers, dead letters),
//! through one producer, and the one place that builds a dead letter (payload as it was,
//! headers saying why, where it came from and which consumer gave up on it).
//!
//! Every record is confirmed one by one: the producer's delivery report of each is looked at,
//! and a record Kafka refused (too large for the topic, not authorised, no such topic) is kept
//! and sent again by the next [`Outbox::confirm`], which fails until every record sent so far
//! is acknowledged. A caller moves an offset or a marker past its records only after a
//! `confirm` that succeeded, so a refusal holds the consumer back (and is counted, logged and
//! reported to readiness by the caller) instead of losing the record; and it never spins, since
//! the caller confirms again only after its backoff.
//!
//! The one failure that waiting cannot cure is a fatal error of the idempotent producer
//! (librdkafka can no longer promise no duplicates and no reordering, and refuses every record
//! from then on). Then `confirm` says [`OutboxError::Fatal`] and stops the process through its
//! [`Shutdown`]: nothing unacknowledged was committed, so the restarted service (a fresh
//! producer) sends it all again.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};

use crate::Shutdown;

/// Counted each time Kafka refuses a record (labels `topic`, `error`), so a record refused on
/// every retry counts once per try; each is kept and sent again.
pub const UNDELIVERED: &str = "pulse_outbox_undelivered_total";

/// The largest record the outbox sends, and the `max.message.bytes` that `pulse-admin` gives
/// the dead-letter topics it creates.
///
/// A dead letter is a record some topic already took (an event, a trigger) or a profile
/// document, plus headers saying why and where from. With its source's limit, a record as
/// large as the source allows would not fit beside its headers, and since nothing may be lost
/// it would hold its consumer for good. Eight times Kafka's default (1 MiB) leaves room for any
/// record of a source topic at the default, and for the headers.
pub const DEAD_LETTER_MAX_BYTES: usize = 8 * 1024 * 1024;

/// Where a dead-lettered record was read.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// Why [`Outbox::confirm`] failed: nothing sent may be taken as delivered yet.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// Records are still in flight (Kafka slow or unreachable).
    #[error("records not acknowledged yet: {0}")]
    Pending(KafkaError),
    /// Kafka refused records; they are kept and sent again by the next confirm.
    #[error("Kafka refused {count} record(s), the first for topic {topic}: {error}{advice}")]
    Refused {
        count: usize,
        topic: String,
        error: String,
        /// What an operator can do about it, when that is known (else empty).
        advice: String,
    },
    /// The producer failed for good; the process is stopping.
    #[error("the Kafka producer failed for good ({0}); stopping: nothing unacknowledged was committed, a restart sends it again")]
    Fatal(String),
}

/// What every outbox producer is set to: librdkafka never gives up on a record by itself
/// (`message.timeout.ms=0`: what it can retry, it retries), and records as large as
/// [`DEAD_LETTER_MAX_BYTES`] pass unless the configuration sets `message.max.bytes` itself:
/// librdkafka's default (1,000,000) would refuse, before any broker saw it, the dead letter of
/// a record as large as its source topic allows.
fn set_limits(config: &mut ClientConfig) {
    config.set("message.timeout.ms", "0");
    if config.get("message.max.bytes").is_none() {
        // The request that carries the record also carries its framing.
        let limit = DEAD_LETTER_MAX_BYTES + 64 * 1024;
        config.set("message.max.bytes", limit.to_string());
    }
}

/// Whether `error` is librdkafka's fatal error, which no retry cures (the idempotent producer
/// refuses every record after one): a retry loop stops on it, and the process exits.
pub fn is_fatal(error: &KafkaError) -> bool {
    error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal)
}

/// The fatal error `client` raised, if any, as "code: reason".
pub fn fatal_error<C: ClientContext>(client: &rdkafka::client::Client<C>) -> Option<String> {
    client
        .fatal_error()
        .map(|(code, reason)| format!("{code}: {reason}"))
}

/// A record Kafka did not take, kept to be sent again.
#[derive(Debug)]
struct Undelivered {
    topic: String,
    key: Vec<u8>,
    payload: Vec<u8>,
    headers: Option<OwnedHeaders>,
    error: String,
    /// Refused for its size: only a larger limit gets it through.
    too_large: bool,
}

/// Whether Kafka (or the producer before it) refused a record for its size.
/// (librdkafka uses the broker's code for its own check too).
fn is_too_large(error: &KafkaError) -> bool {
    error.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge)
}

/// Bytes of refused records an outbox keeps before [`Outbox::is_full`] tells its caller to
/// stop reading: a topic that refuses every dead letter must hold the consumer back, not let
/// memory grow with every bad record read meanwhile. Eight of the largest dead letters.
pub const MAX_UNDELIVERED_BYTES: usize = 8 * DEAD_LETTER_MAX_BYTES;

/// Collects the records whose delivery failed (delivery reports run on the producer's thread).
#[derive(Default)]
pub struct OutboxContext {
    undelivered: Mutex<Vec<Undelivered>>,
    /// Set by [`Outbox::ordered`]: a record Kafka does not take is not sent again later (after
    /// records sent since, out of order) but fails the outbox for good.
    ordered: bool,
    /// The first record an ordered outbox could not deliver.
    failed: Mutex<Option<String>>,
}

impl OutboxContext {
    fn keep(&self, record: Undelivered) {
        if self.ordered {
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            if failed.is_none() {
                *failed = Some(format!(
                    "an ordered record for topic {} was refused ({}); records after it must not \
                     overtake it",
                    record.topic, record.error
                ));
            }
            return;
        }
        metrics::counter!(UNDELIVERED, "topic" => record.topic.clone(), "error" => record.error.clone())
            .increment(1);
        // One line per record would flood the log while a topic refuses everything: the
        // caller logs each failed confirm once, with the count.
        tracing::debug!(topic = %record.topic, error = %record.error, "Kafka refused a record; it is kept and sent again");
        self.undelivered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
    }

    fn bytes(&self) -> usize {
        let kept = self.undelivered.lock().unwrap_or_else(|p| p.into_inner());
        kept.iter().map(|r| r.key.len() + r.payload.len()).sum()
    }

    fn take(&self) -> Vec<Undelivered> {
        std::mem::take(&mut *self.undelivered.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn put_back(&self, mut records: Vec<Undelivered>) {
        let mut kept = self.undelivered.lock().unwrap_or_else(|p| p.into_inner());
        records.append(&mut kept);
        *kept = records;
    }
}

impl ClientContext for OutboxContext {}

impl ProducerContext for OutboxContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, message)) = result {
            self.keep(Undelivered {
                topic: message.topic().to_string(),
                key: message.key().unwrap_or_default().to_vec(),
                payload: message.payload().unwrap_or_default().to_vec(),
                headers: message.headers().map(|h| h.detach()),
                error: error.to_string(),
                too_large: is_too_large(error),
            });
        }
    }
}

pub struct Outbox {
    producer: ThreadedProducer<OutboxContext>,
    /// Named in the `pulse.consumer` header of its dead letters.
    consumer: &'static str,
    /// Ends the wait of a send on a full queue.
    shutdown: Shutdown,
}

impl Outbox {
    /// A producer from `config` with the outbox's limits (see `set_limits`); what Kafka refuses
    /// is kept and sent again by [`Outbox::confirm`].
    pub fn new(
        mut config: ClientConfig,
        consumer: &'static str,
        shutdown: Shutdown,
    ) -> Result<Self, KafkaError> {
        set_limits(&mut config);
        Ok(Self {
            producer: config.create_with_context(OutboxContext::default())?,
            consumer,
            shutdown,
        })
    }

    /// An outbox whose records reach each partition in the order they were sent, or not at
    /// all: for records whose reader skips anything at or below the last position it applied
    /// (identity records, see `pulse_core::identity`). A record sent again after later ones
    /// would be skipped as already applied, so a refusal is not kept for a later confirm as
    /// [`Outbox::new`] does: it fails the outbox for good (as a fatal producer error does, the
    /// process stops without committing, and the restart sends everything again in order).
    /// `enable.gapless.guarantee` makes librdkafka itself stop at the first gap a failed batch
    /// would leave, so no later record of the partition is written after it.
    pub fn ordered(
        mut config: ClientConfig,
        consumer: &'static str,
        shutdown: Shutdown,
    ) -> Result<Self, KafkaError> {
        config.set("enable.gapless.guarantee", "true");
        set_limits(&mut config);
        let context = OutboxContext {
            ordered: true,
            ..OutboxContext::default()
        };
        Ok(Self {
            producer: config.create_with_context(context)?,
            consumer,
            shutdown,
        })
    }

    /// Queues a record. A full local queue is waited out (back-pressure, not a drop) until the
    /// process stops; a record the producer refuses at once (too large, say), or one still
    /// waiting at a stop, is kept as undelivered: the next confirm fails, so nothing after
    /// it is committed. An ordered outbox that failed sends nothing more (a later record
    /// must not overtake the refused one) and stops the process at once.
    pub fn send(&self, topic: &str, key: &[u8], payload: &[u8], headers: OwnedHeaders) {
        if self.failed_in_order() {
            return;
        }
        let mut record = BaseRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if !self.shutdown.is_stopped() =>
                {
                    record = r;
                    self.shutdown.sleep_blocking(Duration::from_millis(50));
                }
                Err((e, r)) => {
                    self.producer.context().keep(Undelivered {
                        topic: topic.to_string(),
                        key: key.to_vec(),
                        payload: payload.to_vec(),
                        headers: r.headers,
                        error: e.to_string(),
                        too_large: is_too_large(&e),
                    });
                    self.failed_in_order();
                    return;
                }
            }
        }
    }

    /// Queues `payload` for the dead-letter topic `topic`, with the reason and its source
    /// (`extra` adds headers of the caller's, such as the index a document was refused by).
    pub fn dead_letter(
        &self,
        topic: &str,
        source: Source<'_>,
        key: &[u8],
        payload: &[u8],
        reason: &str,
        extra: &[(&str, &str)],
    ) {
        let mut headers = dead_letter_headers(reason, source, self.consumer);
        for (k, v) in extra {
            headers = headers.insert(rdkafka::message::Header {
                key: k,
                value: Some(*v),
            });
        }
        self.send(topic, key, payload, headers);
    }

    /// Whether the records Kafka refused, kept to be sent again, reach
    /// [`MAX_UNDELIVERED_BYTES`]: the caller stops reading new records until a
    /// [`Outbox::confirm`] gets them through.
    pub fn is_full(&self) -> bool {
        self.producer.context().bytes() >= MAX_UNDELIVERED_BYTES
    }

    /// Whether this is an ordered outbox that failed; then the process is stopping (see
    /// [`Outbox::ordered`]).
    fn failed_in_order(&self) -> bool {
        let context = self.producer.context();
        if !context.ordered {
            return false;
        }
        let failed = context
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(reason) = failed else {
            return false;
        };
        if !self.shutdown.is_stopped() {
            tracing::error!(
                reason,
                "an ordered record was refused; stopping the process without committing past it"
            );
            self.shutdown.stop();
        }
        true
    }

    /// The producer's fatal error, if it raised one, or the refusal that failed an ordered
    /// outbox (see [`OutboxError::Fatal`]).
    pub fn fatal_error(&self) -> Option<String> {
        fatal_error(self.producer.client()).or_else(|| {
            let failed = self.producer.context().failed.lock();
            failed.unwrap_or_else(|p| p.into_inner()).clone()
        })
    }

    /// Sends again what Kafka refused before, then waits (at most `timeout`) until every
    /// record sent so far is acknowledged. `Ok` only if none is in flight or refused: then
    /// the offsets and markers that cover them may move. On a fatal producer error it stops
    /// the process (see the module doc).
    pub fn confirm(&self, timeout: Duration) -> Result<(), OutboxError> {
        self.check_fatal()?;
        for r in self.producer.context().take() {
            let headers = r.headers.unwrap_or_default();
            self.send(&r.topic, &r.key, &r.payload, headers);
        }
        let flushed = self.producer.flush(timeout);
        self.check_fatal()?;
        flushed.map_err(OutboxError::Pending)?;
        let refused = self.producer.context().take();
        let Some(first) = refused.first() else {
            return Ok(());
        };
        let advice = match refused.iter().find(|r| r.too_large) {
            Some(r) => format!(
                " (a record of {} bytes is larger than {} takes: raise the topic's \
                 max.message.bytes, or --kafka-opt message.max.bytes if set below it; the \
                 record is kept until then)",
                r.key.len() + r.payload.len(),
                r.topic
            ),
            None => String::new(),
        };
        let error = OutboxError::Refused {
            count: refused.len(),
            topic: first.topic.clone(),
            error: first.error.clone(),
            advice,
        };
        self.producer.context().put_back(refused);
        Err(error)
    }

    /// Makes the producer raise a fatal error as a broker's out-of-sequence answer would
    /// (librdkafka's own testing hook), so that tests can see what a service does then.
    #[doc(hidden)]
    pub fn inject_fatal_error(&self, reason: &str) {
        use rdkafka::bindings::{rd_kafka_resp_err_t, rd_kafka_test_fatal_error};
        let reason = std::ffi::CString::new(reason.replace('\0', " ")).unwrap_or_default();
        // SAFETY: the client pointer is live for as long as `self`, and librdkafka copies the
        // reason before returning.
        unsafe {
            rd_kafka_test_fatal_error(
                self.producer.client().native_ptr(),
                rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
    }

    fn check_fatal(&self) -> Result<(), OutboxError> {
        let Some(reason) = self.fatal_error() else {
            return Ok(());
        };
        if !self.shutdown.is_stopped() {
            tracing::error!(
                reason,
                "the Kafka producer failed for good; stopping the process"
            );
            self.shutdown.stop();
        }
        Err(OutboxError::Fatal(reason))
    }
}

/// The headers every dead letter carries (the notifier, which writes its own, uses them too).
pub fn dead_letter_headers(reason: &str, source: Source<'_>, consumer: &str) -> OwnedHeaders {
    use rdkafka::message::Header;
    let (partition, offset) = (source.partition.to_string(), source.offset.to_string());
    OwnedHeaders::new()
        .insert(Header {
            key: "pulse.error",
            value: Some(reason),
        })
        .insert(Header {
            key: "pulse.source.topic",
            value: Some(source.topic),
        })
        .insert(Header {
            key: "pulse.source.partition",
            value: Some(&partition),
        })
        .insert(Header {
            key: "pulse.source.offset",
            value: Some(&offset),
        })
        .insert(Header {
            key: "pulse.consumer",
            value: Some(consumer),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    #[test]
    fn a_dead_letter_says_why_where_from_and_who_gave_up() {
        let source = Source {
            topic: "events",
            partition: 7,
            offset: 1234,
        };
        let headers = dead_letter_headers("cart_amount: out of range", source, "speed");
        let got: Vec<(String, String)> = headers
            .iter()
            .map(|h| {
                let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                (h.key.to_string(), value.into_owned())
            })
            .collect();
        let want = [
            ("pulse.error", "cart_amount: out of range"),
            ("pulse.source.topic", "events"),
            ("pulse.source.partition", "7"),
            ("pulse.source.offset", "1234"),
            ("pulse.consumer", "speed"),
        ];
        assert_eq!(
            got,
            want.map(|(k, v)| (k.to_string(), v.to_string())).to_vec()
        );
    }
}
