//! Promotion and rollback: the alias moves in one `_aliases` request, after the index was
//! caught up to the live layer's final commit.
//!
//! The handover is exact because the live layer is stopped first: its last commit is then
//! final, every event below it was folded by the live layer (and its trigger fired), and the
//! new index is caught up to exactly that commit. The live layer, started again in the same
//! group, resumes at that commit against the new index: no event is folded twice or missed,
//! and each new event fires its trigger once.

use serde_json::{json, Value};

use std::collections::BTreeMap;

use super::run::{run_leased, Target};
use super::{indices, kafka, lease, RecomputeArgs, RecomputeError, RunSummary};
use crate::store::ProfileStore;
use pulse_service::Shutdown;

/// What a promotion or rollback did.
#[derive(Debug, serde::Serialize)]
pub struct Switch {
    pub alias: String,
    pub from: Option<String>,
    pub to: String,
    /// The catch-up run that brought `to` to the live layer's commit.
    pub caught_up: RunSummary,
    /// Documents of erased people deleted from `to` before the alias moved: folded before
    /// their erasure was recorded.
    pub erased_deleted: u64,
}

/// Refuses while the live group has members: their commit is not final yet. The live
/// group's commits, which the catch-up then folds up to: the bound the alias swap checks again.
pub(super) fn live_stopped(args: &RecomputeArgs) -> Result<LiveBound, RecomputeError> {
    let members = kafka::members(&args.speed.kafka, &args.speed.group)?;
    if members > 0 {
        return Err(RecomputeError::Refused(format!(
            "the live group {} has {members} member(s): stop the live speed layer first \
             (SIGTERM: it flushes and commits), then promote, then start it again",
            args.speed.group
        )));
    }
    live_commits(args)
}

/// Where the live group has committed, per partition of the events topic.
pub(super) type LiveBound = BTreeMap<i32, i64>;

fn live_commits(args: &RecomputeArgs) -> Result<LiveBound, RecomputeError> {
    let topic = &args.speed.topics.events;
    let partitions = kafka::retained(&args.speed.kafka, topic)?.partitions();
    Ok(kafka::committed(
        &args.speed.kafka,
        &args.speed.group,
        topic,
        &partitions,
    )?)
}

/// Checked again just before the alias moves: the live layer is still stopped and its commits
/// are still the ones the catch-up folded to. An orchestrator may have restarted it during the
/// catch-up (it does so by itself): then the events it committed since are in the old index
/// only, and the profiles it holds, loaded from the old index, would go on into the new one
/// once the alias moved. The swap is refused and the alias left where it was.
pub(super) fn still_stopped(args: &RecomputeArgs, bound: &LiveBound) -> Result<(), RecomputeError> {
    let members = kafka::members(&args.speed.kafka, &args.speed.group)?;
    let now = live_commits(args)?;
    if members == 0 && &now == bound {
        return Ok(());
    }
    let moved: Vec<String> = now
        .iter()
        .filter(|(p, o)| bound.get(p) != Some(o))
        .map(|(p, o)| {
            format!(
                "{p}: {} -> {o}",
                bound.get(p).map_or("none".into(), |b| b.to_string())
            )
        })
        .take(10)
        .collect();
    Err(RecomputeError::Refused(format!(
        "the live group {} changed during the catch-up ({members} member(s) now; commits moved \
         on partitions [{}]): the live layer was started again. The alias is left on the old \
         index; stop the live layer and promote again",
        args.speed.group,
        moved.join(", ")
    )))
}

/// Catches `args.index` up to the live layer's final commit and points the alias to it,
/// recording in its `_meta` the index it replaced and where that one stopped.
pub fn promote(args: &RecomputeArgs, stop: Shutdown) -> Result<Switch, RecomputeError> {
    lease::with_lease(args, &args.index, "promote", &stop, || {
        let bound = live_stopped(args)?;
        let caught_up = run_leased(args, stop.clone(), Target::Existing)?;
        switch(args, caught_up, &bound)
    })
}

/// Points the alias back to the index the current one replaced, caught up first from where
/// it stopped to the live layer's commit (folded with the flags given now: pass the old
/// models' flags when rolling back a model change).
pub fn rollback(args: &RecomputeArgs, stop: Shutdown) -> Result<Switch, RecomputeError> {
    live_stopped(args)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let live = ProfileStore::new(&args.speed.es)?;
    let alias = &args.speed.es.alias;
    let current = runtime
        .block_on(indices::alias_target(&live, alias))?
        .ok_or_else(|| RecomputeError::Refused(format!("alias {alias} points nowhere")))?;
    let meta = runtime.block_on(indices::meta(&live, &current))?;
    let previous = meta["pulse"]["previous"].as_str().ok_or_else(|| {
        RecomputeError::Refused(format!(
            "index {current} records no previous index (it was not promoted by a recompute)"
        ))
    })?;
    drop(runtime);
    let mut back = args.clone();
    back.index = previous.to_string();
    lease::with_lease(args, previous, "rollback", &stop, || {
        let bound = live_stopped(args)?;
        // The previous index stopped being written at the promotion: its catch-up starts there.
        let until: Vec<(i32, i64)> = meta["pulse"]["previous_until"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(p, v)| Some((p.parse().ok()?, v.as_i64()?)))
                    .collect()
            })
            .unwrap_or_default();
        kafka::commit(
            &args.speed.kafka,
            &back.group(),
            &args.speed.topics.events,
            &until,
        )?;
        let caught_up = run_leased(&back, stop.clone(), Target::Existing)?;
        switch(&back, caught_up, &bound)
    })
}

fn switch(
    args: &RecomputeArgs,
    caught_up: RunSummary,
    bound: &LiveBound,
) -> Result<Switch, RecomputeError> {
    let runtime = tokio::runtime::Runtime::new()?;
    let live = ProfileStore::new(&args.speed.es)?;
    let alias = &args.speed.es.alias;
    let from = runtime.block_on(indices::alias_target(&live, alias))?;
    let until: serde_json::Map<String, Value> = bound
        .iter()
        .map(|(p, o)| (p.to_string(), json!(o)))
        .collect();
    let meta = json!({"pulse": {
        "previous": from,
        "previous_until": until,
        "promoted_at": chrono::Utc::now().to_rfc3339(),
    }});
    runtime.block_on(indices::set_meta(&live, &args.index, meta))?;
    // Read whole now, after the catch-up: every erasure recorded before the alias moves.
    let erasures = args
        .speed
        .erasure_feed()
        .map_err(crate::engine::EngineError::from)?;
    let erased = erasures.read().clone();
    let erased_deleted = runtime.block_on(crate::erase::cleanse(&live, &args.index, &erased))?;
    if erased_deleted > 0 {
        tracing::info!(index = %args.index, erased_deleted, "erased people's profiles deleted before the switch");
    }
    // Every document searchable before the alias shows the index: the catch-up set the
    // refresh interval back, but the refresh itself comes only with the next tick, and a
    // query in between would find the index empty.
    runtime.block_on(live.on_index(&args.index).refresh())?;
    still_stopped(args, bound)?;
    runtime.block_on(indices::swap(&live, alias, from.as_deref(), &args.index))?;
    tracing::info!(%alias, from = ?from, to = %args.index, "alias moved");
    Ok(Switch {
        alias: alias.clone(),
        from,
        to: args.index.clone(),
        caught_up,
        erased_deleted,
    })
}
