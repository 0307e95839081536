//! Pieces of the consumer skeleton the speed layer and the archiver share.

use rdkafka::{Offset, TopicPartitionList};

/// Counted when a position cannot be put into a commit: that partition's commit is left out
/// (it is committed with a later one), and an operator sees it rather than a lag that
/// never shrinks for no stated reason.
pub const COMMIT_PREPARATION_FAILURES: &str = "pulse_commit_preparation_failures_total";

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
