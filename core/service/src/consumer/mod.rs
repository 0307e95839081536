//! The consumer skeleton the speed layer and the archiver share: a member of a consumer group
//! that owns partitions, reads them, and commits a partition's position only after the work
//! that covers it is done (profiles flushed, a Parquet unit and its marker written).
//!
//! - [`group`]: joining the group, and the rebalance hooks ([`PartitionOwner`]) that run inside
//!   `poll`, so that a revoked partition's work is finished before another member reads it;
//!   reading what is there in one batch ([`poll_batch`]) and knowing when every partition was
//!   read to its end ([`EndOfPartitions`], for `--stop-at-end`).
//! - [`positions`]: which partitions are owned, how far each was read and committed, and where
//!   a re-read starts.
//! - [`compacted`]: a compacted topic's partition read to its end (state restored at start).
//! - [`Commit`]: what commits positions, the group's consumer in production, a recorder in the
//!   unit tests of the consumers' logic.

pub mod compacted;
pub mod group;
pub mod positions;

pub use group::{
    committer, is_end_of_partition, join, lock, poll_batch, topic_committer, EndOfPartitions,
    GroupConsumer, GroupContext, PartitionOwner,
};
pub use positions::Positions;

use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

/// Counted when a position cannot be put into a commit: that partition's commit is left out
/// (it is committed with a later one), and an operator sees it rather than a lag that
/// never shrinks for no stated reason.
pub const COMMIT_PREPARATION_FAILURES: &str = "pulse_commit_preparation_failures_total";

/// Commits read positions (partition, next offset to read) of the consumer's topic.
pub trait Commit {
    fn commit(&self, positions: &[(i32, i64)]) -> Result<(), KafkaError>;

    /// Whether the group already gave this member's partitions to others (it missed its
    /// session or its poll interval): work on them must not be made to look done.
    fn assignment_lost(&self) -> bool {
        false
    }
}

/// How many partitions `topic` has: what each record's partition is checked against
/// (`pulse_core::partitioner`). Waits, retrying with backoff and saying so, while the topic
/// does not exist yet or the broker does not answer; `Err` only when `stop` comes first.
pub fn partition_count(
    client: &rdkafka::ClientConfig,
    topic: &str,
    stop: &crate::Shutdown,
) -> Result<i32, KafkaError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = client.create()?;
    let policy = crate::RetryPolicy::forever(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(5),
    );
    let counted = policy.run_blocking(
        stop,
        "reading the topic's partition count",
        |_| true,
        || {
            let md = consumer.fetch_metadata(Some(topic), std::time::Duration::from_secs(10))?;
            match md.topics().iter().find(|t| t.name() == topic) {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                    Ok(t.partitions().len() as i32)
                }
                Some(t) => Err(KafkaError::MetadataFetch(
                    t.error()
                        .map(rdkafka::error::RDKafkaErrorCode::from)
                        .unwrap_or(rdkafka::error::RDKafkaErrorCode::UnknownTopicOrPartition),
                )),
                None => Err(KafkaError::MetadataFetch(
                    rdkafka::error::RDKafkaErrorCode::UnknownTopicOrPartition,
                )),
            }
        },
    );
    counted.map_err(crate::RetryError::into_inner)
}

/// The list to commit for `positions` (partition, next offset to read) of `topic`. A
/// position librdkafka refuses is logged and counted, never silently dropped.
pub fn commit_list(
    topic: &str,
    positions: impl IntoIterator<Item = (i32, i64)>,
) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (partition, next) in positions {
        if let Err(e) = tpl.add_partition_offset(topic, partition, Offset::Offset(next)) {
            metrics::counter!(COMMIT_PREPARATION_FAILURES, "topic" => topic.to_string())
                .increment(1);
            tracing::error!(topic, partition, next, error = %e, "offset left out of the commit");
        }
    }
    tpl
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_position_is_in_the_list() {
        let tpl = commit_list("events", [(0, 10), (3, 7)]);
        let got: Vec<(i32, Offset)> = tpl
            .elements()
            .iter()
            .map(|e| (e.partition(), e.offset()))
            .collect();
        assert_eq!(got, vec![(0, Offset::Offset(10)), (3, Offset::Offset(7))]);
    }
}
