//! Unlink: a device split back from the person it was merged into, exactly as the two would
//! be had the link never been made, and the link never made again.
//!
//! With the live layer stopped (its commit is final), the unlink is first recorded in the
//! compacted `--unlinks-topic` (`crate::unlinks`), and announced in the events topic (so the
//! archive and the warehouse's `identities` have it): from then on every process that folds
//! profiles applies it from the beginning of history (the device never merges, its merges and
//! forwarded events are not applied to a person, no person asks for it). Then the two
//! profiles are refolded under that rule by a recompute of just them (the partitions of the
//! two, only their records folded: [`super::Scope`]) into a scratch index, from the archive
//! and Kafka up to the live commit; the two documents replace the live ones (written with the
//! live commit as their version, so nothing the live layer stored can be newer), and the
//! scratch index and its group are deleted. Started again, the live layer resumes at its
//! commit under the same rule, and a later recompute reaches the same two documents.
//!
//! A crash at any step is finished by running the same command again: the unlink is read back
//! from the topic (the person too), and the refold starts afresh.

use std::collections::{BTreeSet, HashSet};

use chrono::Utc;
use pulse_core::event::partition_key;
use pulse_core::identity::Unlink;
use pulse_service::Shutdown;
use serde_json::Value;

use super::promote::{live_stopped, still_stopped};
use super::{indices, RecomputeArgs, RecomputeError, Scope, Source};
use crate::config::SpeedConfig;
use crate::store::{DocWrite, ItemOutcome, ProfileStore};
use crate::unlinks::Unlinks;

#[derive(Debug, Clone, clap::Args)]
pub struct UnlinkArgs {
    /// The live layer's settings (the same models and flags it runs with).
    #[command(flatten)]
    pub speed: SpeedConfig,
    #[arg(long = "partner")]
    pub partner: String,
    /// The device to split from its person.
    #[arg(long = "anonymous-id")]
    pub anonymous_id: String,
    /// Where history comes from (the archive, then Kafka; or Kafka only).
    #[arg(long, env = "PULSE_RECOMPUTE_SOURCE", value_enum, default_value_t = Source::Archive)]
    pub source: Source,
    #[command(flatten)]
    pub archive: pulse_archive::store::StoreArgs,
}

/// What an unlink did, printed as JSON.
#[derive(Debug, serde::Serialize)]
pub struct UnlinkReport {
    pub partner_id: String,
    pub anonymous_id: String,
    /// The person the device had been merged into.
    pub user_id: String,
    /// The two profiles as written (`None`: the device had no event of its own, so it has
    /// no profile now).
    pub device: Option<Summary>,
    pub person: Option<Summary>,
    /// The refold (a recompute of the two profiles' partitions).
    pub refold: super::RunSummary,
}

/// A profile's counts, for the report.
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub event_count: i64,
    pub total_purchases: Value,
    pub aliases: Value,
}

impl Summary {
    fn of(doc: &Value) -> Self {
        Self {
            event_count: doc["event_count"].as_i64().unwrap_or_default(),
            total_purchases: doc["total_purchases"].clone(),
            aliases: doc.get("aliases").cloned().unwrap_or(Value::Null),
        }
    }
}

/// Splits `args.anonymous_id` from its person (see the module documentation). One unlink at
/// a time per alias (a lease): two refolding one person at once would each write it without
/// the other's device.
pub fn unlink(args: &UnlinkArgs, stop: Shutdown) -> Result<UnlinkReport, RecomputeError> {
    let lease = format!("{}-unlinks", args.speed.es.alias);
    let lease_args = RecomputeArgs {
        speed: args.speed.clone(),
        index: lease.clone(),
        source: args.source,
        archive: args.archive.clone(),
        max_events_per_sec: 0,
        failpoint_kill_at: None,
        scope: None,
    };
    super::lease::with_lease(&lease_args, &lease, "unlink", &stop, || {
        unlink_leased(args, stop.clone())
    })
}

fn unlink_leased(args: &UnlinkArgs, stop: Shutdown) -> Result<UnlinkReport, RecomputeError> {
    let (partner, device) = (&args.partner, &args.anonymous_id);
    pulse_core::validate::check_person_id("anonymous_id", partner, device)
        .map_err(|e| RecomputeError::Refused(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let live = ProfileStore::new(&args.speed.es)?;
    let device_id = partition_key(partner, device);
    let topic = &args.speed.topics.unlinks;
    let unlinks = Unlinks::load(&args.speed.kafka, topic)?;
    let person = match unlinks.get(&device_id) {
        // Recorded by an unlink that did not finish: this run finishes it.
        Some(u) => u.user_id.clone(),
        None => {
            let doc = runtime.block_on(live.get(&device_id))?;
            let merged = doc.as_ref().and_then(|d| d["merged_into"].as_str());
            merged.map(str::to_string).ok_or_else(|| {
                RecomputeError::Refused(format!(
                    "{device_id} is not merged into a person (no such profile, or a profile of \
                     its own): nothing to unlink"
                ))
            })?
        }
    };
    let person_id = partition_key(partner, &person);
    let partitions = super::kafka::retained(&args.speed.kafka, &args.speed.topics.events)?
        .partitions()
        .len() as i32;
    let partition_of = |id: &str| pulse_core::partitioner::partition_of(id.as_bytes(), partitions);
    let scratch = format!(
        "{}-unlink-{}",
        args.speed.es.alias,
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let refold = RecomputeArgs {
        speed: args.speed.clone(),
        index: scratch.clone(),
        source: args.source,
        archive: args.archive.clone(),
        max_events_per_sec: 0,
        failpoint_kill_at: None,
        scope: Some(Scope {
            partitions: BTreeSet::from([partition_of(&device_id), partition_of(&person_id)]),
            ids: HashSet::from([device_id.clone(), person_id.clone()]),
        }),
    };
    let bound = live_stopped(&refold)?;
    preflight(&refold, &runtime)?;
    let unlink = Unlink {
        partner_id: partner.clone(),
        anonymous_id: device.clone(),
        user_id: person.clone(),
        unlinked_at: Utc::now(),
    };
    if unlinks.get(&device_id).is_none() {
        runtime
            .block_on(Unlinks::record(&args.speed.kafka, topic, &unlink))
            .map_err(RecomputeError::Refused)?;
        tracing::info!(device = %device_id, person = %person_id, "unlink recorded");
    }
    runtime
        .block_on(Unlinks::announce(
            &args.speed.kafka,
            &args.speed.topics.events,
            &unlink,
        ))
        .map_err(RecomputeError::Refused)?;
    let summary = super::run::run(&refold, stop);
    let written = summary.and_then(|summary| {
        still_stopped(&refold, &bound)?;
        let scratch_store = live.on_index(&scratch);
        let ids = [device_id.clone(), person_id.clone()];
        let docs = runtime.block_on(scratch_store.mget(&ids))?;
        let mut report = UnlinkReport {
            partner_id: partner.clone(),
            anonymous_id: device.clone(),
            user_id: person.clone(),
            device: docs.get(&device_id).map(Summary::of),
            person: docs.get(&person_id).map(Summary::of),
            refold: summary,
        };
        for id in &ids {
            let version = bound.get(&partition_of(id)).copied().unwrap_or(0) - 1;
            runtime.block_on(replace(&live, id, docs.get(id), version))?;
        }
        report.refold.index = scratch.clone();
        Ok(report)
    });
    // The scratch index and its group go whatever happened (a run again starts afresh).
    let _ = runtime.block_on(indices::delete(&live, &scratch));
    let group = [refold.group()];
    if let Err(e) = runtime.block_on(super::cleanup::delete_groups(&args.speed.kafka, &group)) {
        tracing::warn!(error = %e, "deleting the refold's group failed");
    }
    written
}

/// Refuses before anything is recorded when the refold could not read the two profiles'
/// whole history: a retention gap the archive does not cover, or, from Kafka alone, a
/// partition Kafka no longer holds from its start (the refold would write profiles missing
/// what retention dropped over the complete live ones).
fn preflight(
    refold: &RecomputeArgs,
    runtime: &tokio::runtime::Runtime,
) -> Result<(), RecomputeError> {
    let archive = super::plan::open_archive(refold)?;
    let mut plan = runtime.block_on(super::plan::make(refold, archive.as_deref(), true))?;
    if let Some(scope) = &refold.scope {
        plan.partitions
            .retain(|p| scope.partitions.contains(&p.partition));
    }
    plan.check()?;
    if refold.source == Source::Kafka {
        if let Some(p) = plan.partitions.iter().find(|p| p.low > 0) {
            return Err(RecomputeError::Refused(format!(
                "Kafka no longer holds partition {} from its start (its first offset is {}): \
                 a refold from Kafka alone would lose that history; unlink from the archive \
                 (--source archive)",
                p.partition, p.low
            )));
        }
    }
    Ok(())
}

/// Puts `doc` in place of the live document `id` (deletes it when `None`), with `version`:
/// the live commit of its partition less one, at or above any version the live layer wrote.
async fn replace(
    live: &ProfileStore,
    id: &str,
    doc: Option<&Value>,
    version: i64,
) -> Result<(), RecomputeError> {
    let Some(doc) = doc else {
        live.delete(id).await?;
        return Ok(());
    };
    let write = DocWrite {
        id: id.to_string(),
        version: version.max(0),
        doc: serde_json::to_vec(doc).unwrap_or_default(),
    };
    match live.bulk_write(&[write]).await?.as_slice() {
        [ItemOutcome::Written] => Ok(()),
        other => Err(RecomputeError::Refused(format!(
            "writing {id} into the live index: {other:?} (a document newer than the live \
             layer's commit: start the live layer and stop it again, so that it commits what \
             it stored, then run the unlink again)"
        ))),
    }
}
