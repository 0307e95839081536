//! What the speed layer writes to Kafka beside its profiles: triggers, dead-lettered records
//! and dead-lettered profile documents, through the one [`Outbox`] of `pulse-service`; and the
//! identity records that carry a merge between partitions, through an ordered one.

use pulse_core::identity::IdentityRecord;
use pulse_service::consumer::Commit;
use pulse_service::outbox::{Outbox, Source};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedHeaders, OwnedMessage};
use std::time::Duration;

use super::state::Effects;
use crate::metrics as m;
use crate::store::DocWrite;
use crate::triggers::TriggerMessage;

/// How long a confirm waits for Kafka's acknowledgements: ample for a broker that answers
/// (they take milliseconds), and short enough that the poll loop, a revocation or the final
/// flush is not held long by one that does not (the confirm is then tried again after the
/// flush backoff).
pub(crate) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// The speed layer's side outputs and the topics they go to.
pub(crate) struct SpeedOutbox {
    outbox: Outbox,
    /// Identity records, written to the events topic in order (see [`Outbox::ordered`]); a
    /// recompute, which writes none, has none.
    identity: Option<Outbox>,
    /// The topic the records come from (the source of a dead-lettered document).
    pub events_topic: String,
    pub dlq_topic: String,
    pub triggers_topic: String,
    pub profiles_dlq_topic: String,
    /// The alias documents are written through, named in a dead-lettered document.
    pub alias: String,
}

impl SpeedOutbox {
    pub fn new(outbox: Outbox, topics: &pulse_core::kafka::TopicArgs, alias: &str) -> Self {
        Self {
            outbox,
            identity: None,
            events_topic: topics.events.clone(),
            dlq_topic: topics.dlq.clone(),
            triggers_topic: topics.triggers.clone(),
            profiles_dlq_topic: topics.profiles_dlq.clone(),
            alias: alias.to_string(),
        }
    }

    /// Writes identity records through `ordered` (an [`Outbox::ordered`]).
    pub fn with_identity(mut self, ordered: Outbox) -> Self {
        self.identity = Some(ordered);
        self
    }

    /// Queues an identity record for the events topic, keyed by the profile it changes, with
    /// the header that tells it from an event. Confirmed with the other side outputs before
    /// any flush: the documents written then carry watermarks past the record that made it.
    pub fn identity(&self, record: &IdentityRecord) {
        let Some(ordered) = &self.identity else {
            tracing::error!("an identity record without an identity producer (a bug); not sent");
            return;
        };
        let headers = IdentityRecord::headers();
        let payload = record.to_json();
        ordered.send(
            &self.events_topic,
            record.key().as_bytes(),
            &payload,
            headers,
        );
    }

    /// Queues a fired trigger, keyed by its user (`partner:user`, see `TriggerMessage::key`),
    /// so that one notifier owns each user's dedupe and rate limit.
    pub fn trigger(&self, message: &TriggerMessage) {
        let payload = serde_json::to_vec(message).unwrap_or_default();
        self.outbox.send(
            &self.triggers_topic,
            message.key().as_bytes(),
            &payload,
            OwnedHeaders::new(),
        );
    }

    /// Whether Kafka refused so much that reading must wait (see `Outbox::is_full`).
    pub fn is_full(&self) -> bool {
        self.outbox.is_full()
    }

    /// A record we cannot use goes to the dead-letter topic with the reason and its origin.
    pub fn dead_letter_record(&self, msg: &OwnedMessage, reason: &str) {
        tracing::warn!(
            partition = msg.partition(),
            offset = msg.offset(),
            reason,
            "record to dead-letter topic"
        );
        metrics::counter!(m::EVENTS_DEAD_LETTERED).increment(1);
        let source = Source {
            topic: msg.topic(),
            partition: msg.partition(),
            offset: msg.offset(),
        };
        self.outbox.dead_letter(
            &self.dlq_topic,
            source,
            msg.key().unwrap_or_default(),
            msg.payload().unwrap_or_default(),
            reason,
            &[],
        );
    }

    /// A profile document the store refused for good, with the reason, the event that last
    /// changed it as its source (the document's version is that offset) and the alias, so it
    /// can be written again once the cause is fixed.
    pub fn dead_letter_document(&self, write: &DocWrite, partition: i32, reason: &str) {
        let source = Source {
            topic: &self.events_topic,
            partition,
            offset: write.version,
        };
        self.outbox.dead_letter(
            &self.profiles_dlq_topic,
            source,
            write.id.as_bytes(),
            &write.doc,
            reason,
            &[("pulse.index", &self.alias)],
        );
    }

    /// The producer's fatal error, if it raised one: the outbox then stopped the process.
    pub fn fatal_error(&self) -> Option<String> {
        self.outbox
            .fatal_error()
            .or_else(|| self.identity.as_ref().and_then(Outbox::fatal_error))
    }

    /// Test-only: see `SpeedConfig::failpoint_fatal_producer_message_id`.
    pub fn inject_fatal_error(&self, reason: &str) {
        self.outbox.inject_fatal_error(reason);
    }

    /// The state's effects: this outbox, and commits through `commit`.
    pub fn effects<'a>(&'a self, commit: &'a dyn Commit) -> KafkaEffects<'a> {
        KafkaEffects {
            outbox: self,
            commit,
        }
    }
}

/// The state's [`Effects`] in production: the outbox and the group's consumer.
pub(crate) struct KafkaEffects<'a> {
    outbox: &'a SpeedOutbox,
    commit: &'a dyn Commit,
}

impl Commit for KafkaEffects<'_> {
    fn commit(&self, positions: &[(i32, i64)]) -> Result<(), KafkaError> {
        self.commit.commit(positions)
    }
}

impl Effects for KafkaEffects<'_> {
    fn dead_letter_document(&self, write: &DocWrite, partition: i32, reason: &str) {
        self.outbox.dead_letter_document(write, partition, reason);
    }

    fn confirm(&self) -> Result<(), String> {
        if let Some(ordered) = &self.outbox.identity {
            ordered
                .confirm(CONFIRM_TIMEOUT)
                .map_err(|e| e.to_string())?;
        }
        self.outbox
            .outbox
            .confirm(CONFIRM_TIMEOUT)
            .map_err(|e| e.to_string())
    }

    fn failed_for_good(&self) -> bool {
        self.outbox.fatal_error().is_some()
    }
}
