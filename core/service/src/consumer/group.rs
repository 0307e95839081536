//! A member of a consumer group: joining it, the rebalance hooks, reading in batches.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientConfig, ClientContext, TopicPartitionList};

use super::{commit_list, Commit};

/// What a consumer does when the group moves partitions. Both hooks run on the polling
/// thread, inside `poll`, with the owner locked: nothing else of the consumer runs meanwhile.
pub trait PartitionOwner: Send + 'static {
    /// `partitions` are this member's now.
    fn assigned(&mut self, partitions: &[i32]);

    /// `partitions` are about to go to another member: finish and commit their work if
    /// possible, then forget them. `lost`: the group has already given them away (this member
    /// missed its session), so a commit would be refused and the new owner re-reads from the
    /// last one.
    fn revoking(&mut self, commit: &dyn Commit, partitions: &[i32], lost: bool);
}

/// The consumer context of a group member: routes rebalances to its [`PartitionOwner`] and
/// logs client errors (except end-of-partition, which is news, not a fault).
pub struct GroupContext<W> {
    owner: Arc<Mutex<W>>,
    topic: String,
}

impl<W: PartitionOwner> GroupContext<W> {
    /// The context of a consumer of `topic` (for a consumer other than [`join`]'s, such as a
    /// `StreamConsumer`).
    pub fn new(owner: Arc<Mutex<W>>, topic: &str) -> Self {
        Self {
            owner,
            topic: topic.to_string(),
        }
    }
}

pub type GroupConsumer<W> = BaseConsumer<GroupContext<W>>;

/// Creates a consumer from `config` and subscribes it to `topic`, with `owner` called on
/// every rebalance.
pub fn join<W: PartitionOwner>(
    config: &ClientConfig,
    topic: &str,
    owner: Arc<Mutex<W>>,
) -> Result<GroupConsumer<W>, KafkaError> {
    let consumer: GroupConsumer<W> = config.create_with_context(GroupContext::new(owner, topic))?;
    consumer.subscribe(&[topic])?;
    Ok(consumer)
}

/// The owner behind `mutex`, even if a panic poisoned it: the rebalance hooks of a stopping
/// consumer must still be able to give its partitions up.
pub fn lock<W>(mutex: &Mutex<W>) -> MutexGuard<'_, W> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Commits through `consumer` on its topic, synchronously: the caller moves on only once the
/// group has the position.
pub fn committer<W>(consumer: &GroupConsumer<W>) -> impl Commit + '_
where
    W: PartitionOwner,
{
    TopicCommit {
        consumer,
        topic: &consumer.context().topic,
    }
}

/// Commits through any consumer of `topic` (one that assigns its partitions itself, as a
/// recompute does, commits under its `group.id` all the same).
pub fn topic_committer<'a, C: ConsumerContext>(
    consumer: &'a BaseConsumer<C>,
    topic: &'a str,
) -> impl Commit + 'a {
    TopicCommit { consumer, topic }
}

struct TopicCommit<'a, C: ConsumerContext> {
    consumer: &'a BaseConsumer<C>,
    topic: &'a str,
}

impl<C: ConsumerContext> Commit for TopicCommit<'_, C> {
    fn commit(&self, positions: &[(i32, i64)]) -> Result<(), KafkaError> {
        let tpl = commit_list(self.topic, positions.iter().copied());
        if tpl.count() == 0 {
            return Ok(());
        }
        self.consumer.commit(&tpl, CommitMode::Sync)
    }

    fn assignment_lost(&self) -> bool {
        self.consumer.assignment_lost()
    }
}

impl<W: PartitionOwner> ClientContext for GroupContext<W> {
    fn error(&self, error: KafkaError, reason: &str) {
        if !is_end_of_partition(&error) {
            tracing::error!(%error, reason, "kafka client error");
        }
    }
}

impl<W: PartitionOwner> ConsumerContext for GroupContext<W> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions = partitions_of(tpl);
            let lost = consumer.assignment_lost();
            tracing::info!(?partitions, lost, "partitions revoked");
            let commit = TopicCommit {
                consumer,
                topic: &self.topic,
            };
            lock(&self.owner).revoking(&commit, &partitions, lost);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let partitions = partitions_of(tpl);
            tracing::info!(?partitions, "partitions assigned");
            lock(&self.owner).assigned(&partitions);
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

/// Whether a client error only reports reaching the end of a partition: how `--stop-at-end`
/// consumers learn they are done, not a fault worth logging as one.
pub fn is_end_of_partition(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
    )
}

/// Reads into `batch` (cleared first) up to `max` records: waits up to `wait` for the first,
/// then takes what is already there until `linger` has passed since the call began. So one
/// round of work (one lock, one `mget`) serves many records, and none waits noticeably.
pub fn poll_batch<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    batch: &mut Vec<OwnedMessage>,
    max: usize,
    wait: Duration,
    linger: Duration,
    ends: &mut EndOfPartitions,
) {
    batch.clear();
    let started = Instant::now();
    while batch.len() < max.max(1) {
        let timeout = if batch.is_empty() {
            wait
        } else if started.elapsed() < linger {
            Duration::ZERO
        } else {
            break;
        };
        match consumer.poll(timeout) {
            Some(Ok(msg)) => {
                ends.reading(msg.partition());
                batch.push(msg.detach());
            }
            Some(Err(KafkaError::PartitionEOF(p))) => ends.reached(p),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "consumer error");
                break;
            }
            None => break,
        }
    }
}

/// The partitions read to their end (reported with `enable.partition.eof`), for consumers
/// that stop once everything is read (`--stop-at-end`).
#[derive(Debug, Default)]
pub struct EndOfPartitions {
    at_end: HashSet<i32>,
}

impl EndOfPartitions {
    pub fn reached(&mut self, partition: i32) {
        self.at_end.insert(partition);
    }

    /// A record of `partition` came in: it is not at its end any more.
    pub fn reading(&mut self, partition: i32) {
        self.at_end.remove(&partition);
    }

    /// Whether this member owns partitions and every one of them is read to its end.
    pub fn all_read<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) -> bool {
        let Ok(assignment) = consumer.assignment() else {
            return false;
        };
        assignment.count() > 0
            && assignment
                .elements()
                .iter()
                .all(|e| self.at_end.contains(&e.partition()))
    }
}
