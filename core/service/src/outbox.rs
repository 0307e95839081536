//! The outbox of a consumer: the records it writes beside its work (triggers, dead letters),
//! through one producer, and the one place that builds a dead letter (payload as it was,
//! headers saying why, where it came from and which consumer gave up on it).
//!
//! `send` waits out a full local queue (back-pressure, never a drop); [`Outbox::flush`] waits
//! for Kafka's acknowledgements before the caller moves an offset or marker past them.

use std::time::Duration;

use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;

/// Where a dead-lettered record was read.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

pub struct Outbox {
    producer: ThreadedProducer<DefaultProducerContext>,
    /// Named in the `pulse.consumer` header of its dead letters.
    consumer: &'static str,
}

impl Outbox {
    /// A producer from `config` that never gives up on a record by itself
    /// (`message.timeout.ms=0`): what is queued is delivered or the process stops.
    pub fn new(
        mut config: ClientConfig,
        consumer: &'static str,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        config.set("message.timeout.ms", "0");
        Ok(Self {
            producer: config.create()?,
            consumer,
        })
    }

    /// Queues a record, waiting while the local queue is full.
    pub fn send(&self, topic: &str, key: &[u8], payload: &[u8], headers: OwnedHeaders) {
        let mut record = BaseRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((e, r)) => {
                    tracing::warn!(error = %e, topic, "produce failed; retrying");
                    record = r;
                    std::thread::sleep(Duration::from_millis(50));
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

    /// Waits until Kafka acknowledged everything queued, at most `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), rdkafka::error::KafkaError> {
        self.producer.flush(timeout)
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
