//! Cleanup: the indices of the profiles template that no alias points to, and the
//! `recompute-<index>` groups left by indices that are gone.
//!
//! Kept, whatever their age: the index the alias points to, the one it replaced (the target
//! of a `rollback`, named in the live index's `_meta.pulse.previous`) unless
//! `--include-previous`, and any index whose lease a process holds (a recompute running now,
//! a promote; see [`super::lease`]). Cleanup takes an index's lease itself to delete it, so a
//! run cannot start on it in between. An index younger than `--min-age-hours` is kept too (a
//! run stopped for now, to be resumed). Nothing is deleted without `--yes`.

use std::time::Duration;

use pulse_core::kafka::KafkaArgs;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::{indices, lease, RecomputeError};
use crate::store::{EsArgs, ProfileStore};

#[derive(Debug, Clone, clap::Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub es: EsArgs,
    /// Also delete the index a rollback would go back to.
    #[arg(long)]
    pub include_previous: bool,
    /// Keep indices created less than this many hours ago (a recompute may be building one).
    #[arg(long, default_value_t = 24.0)]
    pub min_age_hours: f64,
    /// Delete; without it, only print what would be deleted.
    #[arg(long)]
    pub yes: bool,
}

/// What a cleanup found, and did when `deleted`.
#[derive(Debug, Default, serde::Serialize)]
pub struct Cleanup {
    pub alias: String,
    pub live: Option<String>,
    pub previous: Option<String>,
    /// Indices without an alias, old enough, and neither live nor (by default) previous.
    pub indices: Vec<String>,
    /// Kept because younger than `--min-age-hours`.
    pub too_young: Vec<String>,
    /// Kept because a process holds their lease (a recompute running), with who holds it.
    pub in_use: Vec<(String, String)>,
    /// `recompute-<index>` groups whose index is gone (or goes now), without members.
    pub groups: Vec<String>,
    pub deleted: bool,
}

pub async fn cleanup(args: &CleanupArgs) -> Result<Cleanup, RecomputeError> {
    let store = ProfileStore::new(&args.es)?;
    let alias = args.es.alias.clone();
    let pattern = format!("{alias}-*");
    let live = indices::alias_target(&store, &alias).await?;
    let previous = match &live {
        Some(live) => indices::meta(&store, live).await?["pulse"]["previous"]
            .as_str()
            .map(str::to_string),
        None => None,
    };
    let aliases = indices::aliases_of(&store, &pattern).await?;
    let settings = indices::creation_dates(&store, &pattern).await?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let min_age_ms = (args.min_age_hours * 3_600_000.0) as i64;
    let mut out = Cleanup {
        alias: alias.clone(),
        live: live.clone(),
        previous: previous.clone(),
        ..Cleanup::default()
    };
    let mut existing: Vec<String> = aliases
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .collect();
    existing.sort();
    for (index, entry) in aliases.as_object().into_iter().flatten() {
        let has_alias = entry["aliases"].as_object().is_some_and(|a| !a.is_empty());
        let kept = Some(index) == live.as_ref()
            || (!args.include_previous && Some(index) == previous.as_ref());
        if has_alias || kept {
            continue;
        }
        let created = settings.get(index).copied();
        if created.is_none_or(|c| now_ms - c < min_age_ms) {
            out.too_young.push(index.clone());
        } else {
            out.indices.push(index.clone());
        }
    }
    out.indices.sort();
    out.too_young.sort();
    let candidates = std::mem::take(&mut out.indices);
    for index in candidates {
        match lease::holder(&store, &alias, &index).await? {
            Some(holder) => out.in_use.push((index, holder.describe(now_ms))),
            None => out.indices.push(index),
        }
    }
    out.groups = orphan_groups(&args.kafka, &alias, &remaining_after(&existing, &out))?;
    if args.yes {
        let mut deleted = Vec::new();
        for index in std::mem::take(&mut out.indices) {
            // Under the index's lease: a run that starts meanwhile is refused, and one that
            // starts after finds the index gone (and builds it afresh) rather than losing it
            // midway.
            let lease = match lease::acquire(&store, &alias, &index, "cleanup").await? {
                lease::Acquired::Held(lease) => lease,
                lease::Acquired::Busy(holder) => {
                    out.in_use.push((index, holder.describe(now_ms)));
                    continue;
                }
            };
            let result = indices::delete(&store, &index).await;
            lease.release().await;
            result?;
            tracing::info!(%index, "deleted the index");
            deleted.push(index);
        }
        out.indices = deleted;
        out.groups = orphan_groups(&args.kafka, &alias, &remaining_after(&existing, &out))?;
        delete_groups(&args.kafka, &out.groups).await?;
        out.deleted = true;
    }
    Ok(out)
}

/// The indices that stay: those that exist and are not (to be) deleted.
fn remaining_after<'a>(existing: &'a [String], out: &Cleanup) -> Vec<&'a String> {
    existing
        .iter()
        .filter(|i| !out.indices.contains(i))
        .collect()
}

/// The groups `recompute-<alias>-…` whose index is not among `remaining`, and that have no
/// members.
fn orphan_groups(
    kafka: &KafkaArgs,
    alias: &str,
    remaining: &[&String],
) -> Result<Vec<String>, RecomputeError> {
    let consumer: BaseConsumer = kafka.client_config().create()?;
    let list = consumer.fetch_group_list(None, Duration::from_secs(30))?;
    let prefix = format!("recompute-{alias}-");
    let mut out: Vec<String> = list
        .groups()
        .iter()
        .filter(|g| g.name().starts_with(&prefix) && g.members().is_empty())
        .filter(|g| {
            let index = &g.name()["recompute-".len()..];
            !remaining.iter().any(|r| r.as_str() == index)
        })
        .map(|g| g.name().to_string())
        .collect();
    out.sort();
    Ok(out)
}

pub(super) async fn delete_groups(
    kafka: &KafkaArgs,
    groups: &[String],
) -> Result<(), RecomputeError> {
    if groups.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = kafka.client_config().create()?;
    let names: Vec<&str> = groups.iter().map(String::as_str).collect();
    for result in admin.delete_groups(&names, &AdminOptions::new()).await? {
        match result {
            Ok(group) => tracing::info!(%group, "deleted the group"),
            Err((group, code)) => {
                return Err(RecomputeError::Refused(format!(
                    "deleting group {group}: {code}"
                )))
            }
        }
    }
    Ok(())
}

impl Cleanup {
    /// The report for a terminal.
    pub fn render(&self) -> String {
        let mut s = format!(
            "alias {} -> {}; kept for a rollback: {}\n",
            self.alias,
            self.live.as_deref().unwrap_or("(nothing)"),
            self.previous.as_deref().unwrap_or("(none)")
        );
        let verb = if self.deleted {
            "deleted"
        } else {
            "would delete"
        };
        for i in &self.indices {
            s.push_str(&format!("{verb} index {i}\n"));
        }
        for i in &self.too_young {
            s.push_str(&format!("kept index {i} (younger than --min-age-hours)\n"));
        }
        for (i, holder) in &self.in_use {
            s.push_str(&format!("kept index {i} (in use: its lease is {holder})\n"));
        }
        for g in &self.groups {
            s.push_str(&format!("{verb} group {g}\n"));
        }
        if !self.deleted && (!self.indices.is_empty() || !self.groups.is_empty()) {
            s.push_str("(nothing deleted: add --yes)\n");
        }
        s
    }
}
